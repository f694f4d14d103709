// The Kafka baseline for `cargo xtask bench messaging`: what a Node.js
// service does with Kafka through kafkajs (the npm ecosystem's Kafka
// client), doing the same work as Wharf — a producer with acks=all, each
// publish awaited, a consumer group running a trivial handler, offsets
// committed after it ran. Not idempotent, unlike Wharf's producer: tansu
// 0.6 drops the connection on kafkajs's InitProducerId (librdkafka's works).
//
//   node bench.js HOST:PORT MESSAGES PUBLISHERS LATENCY_MESSAGES LATENCY_RATE
//
// Prints one JSON line: {"throughput": msgs/s, "p50_ms": .., "p99_ms": ..}.
// Throughput: MESSAGES published by PUBLISHERS concurrent loops, timed from
// the first publish to the last message handled. Latency: LATENCY_MESSAGES
// published at LATENCY_RATE per second, each carrying its publish time.
const { Kafka, logLevel } = require('kafkajs');

const [broker, total, publishers, latencyTotal, latencyRate] = process.argv.slice(2);
const now = () => performance.timeOrigin + performance.now();
const run = `${process.pid}-${Date.now()}`;

function percentile(sorted, p) {
  if (sorted.length === 0) return 0;
  const index = Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1);
  return sorted[Math.max(0, index)];
}

async function main() {
  const kafka = new Kafka({ clientId: 'node-bench', brokers: [broker], logLevel: logLevel.ERROR });
  const admin = kafka.admin();
  await admin.connect();
  const producer = kafka.producer({ idempotent: false });
  await producer.connect();

  async function phase(topic, count, onMessage) {
    await admin.createTopics({ topics: [{ topic, numPartitions: 3 }] });
    const consumer = kafka.consumer({ groupId: `node-${topic}` });
    await consumer.connect();
    await consumer.subscribe({ topic, fromBeginning: true });
    let handled = 0;
    let done;
    const finished = new Promise((resolve) => (done = resolve));
    await consumer.run({
      partitionsConsumedConcurrently: 3,
      eachMessage: async ({ message }) => {
        onMessage(message);
        handled += 1;
        if (handled === count) done();
      },
    });
    return { finished, stop: () => consumer.disconnect() };
  }

  const send = (topic, value) => producer.send({ topic, acks: -1, messages: [{ value }] });

  // Throughput.
  const count = Number(total);
  const throughputTopic = `node.bench.t.${run}`;
  const measured = await phase(throughputTopic, count, () => {});
  const started = now();
  let next = 0;
  await Promise.all(
    Array.from({ length: Number(publishers) }, async () => {
      while (next < count) {
        const i = next++;
        await send(throughputTopic, `x${i}`);
      }
    }),
  );
  await measured.finished;
  const throughput = count / ((now() - started) / 1000);
  await measured.stop();

  // Latency at a steady rate below saturation.
  const latencies = [];
  const latencyCount = Number(latencyTotal);
  const latencyTopic = `node.bench.lat.${run}`;
  const timed = await phase(latencyTopic, latencyCount, (message) => {
    latencies.push(now() - Number(message.value.toString()));
  });
  const interval = 1000 / Number(latencyRate);
  const start = now();
  for (let i = 0; i < latencyCount; i++) {
    const due = start + i * interval;
    const wait = due - now();
    if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait));
    send(latencyTopic, String(now())).catch((err) => {
      console.error(err);
      process.exit(1);
    });
  }
  await timed.finished;
  await timed.stop();
  latencies.sort((a, b) => a - b);
  console.log(
    JSON.stringify({
      throughput,
      p50_ms: percentile(latencies, 50),
      p99_ms: percentile(latencies, 99),
    }),
  );
  await producer.disconnect();
  await admin.disconnect();
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
