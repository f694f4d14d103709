// The baseline for `cargo xtask bench messaging`: what a Node.js service
// does with RabbitMQ through amqplib, doing the same work as Wharf —
// persistent messages published with publisher confirms to a topic
// exchange, a durable queue, a consumer with prefetch 16 (Wharf's default
// concurrency) running a trivial handler and acknowledging each message.
//
//   node bench.js AMQP_URL MESSAGES PUBLISHERS LATENCY_MESSAGES LATENCY_RATE
//
// Prints one JSON line: {"throughput": msgs/s, "p50_ms": .., "p99_ms": ..}.
// Throughput: MESSAGES published by PUBLISHERS concurrent loops, timed from
// the first publish to the last acknowledgement. Latency: LATENCY_MESSAGES
// published at LATENCY_RATE per second, each carrying its publish time.
const amqp = require('amqplib');

const [url, total, publishers, latencyTotal, latencyRate] = process.argv.slice(2);
const EXCHANGE = 'nodebench';
const now = () => performance.timeOrigin + performance.now();

function percentile(sorted, p) {
  if (sorted.length === 0) return 0;
  const index = Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1);
  return sorted[Math.max(0, index)];
}

async function main() {
  const connection = await amqp.connect(url);
  const publish = await connection.createConfirmChannel();
  const consume = await connection.createChannel();
  await publish.assertExchange(EXCHANGE, 'topic', { durable: true });
  await consume.prefetch(16);

  async function phase(topic, count, onMessage) {
    const queue = `node.${topic}`;
    await consume.assertQueue(queue, { durable: true });
    await consume.bindQueue(queue, EXCHANGE, topic);
    let handled = 0;
    let done;
    const finished = new Promise((resolve) => (done = resolve));
    const { consumerTag } = await consume.consume(queue, (message) => {
      onMessage(message);
      consume.ack(message);
      handled += 1;
      if (handled === count) done();
    });
    return { finished, stop: () => consume.cancel(consumerTag) };
  }

  const sendConfirmed = (topic, body) =>
    new Promise((resolve, reject) =>
      publish.publish(EXCHANGE, topic, Buffer.from(body), { persistent: true }, (err) =>
        err ? reject(err) : resolve(),
      ),
    );

  // Throughput.
  const count = Number(total);
  const run = await phase('bench.t', count, () => {});
  const started = now();
  let next = 0;
  await Promise.all(
    Array.from({ length: Number(publishers) }, async () => {
      while (next < count) {
        const i = next++;
        await sendConfirmed('bench.t', `x${i}`);
      }
    }),
  );
  await run.finished;
  const throughput = count / ((now() - started) / 1000);
  await run.stop();

  // Latency at a steady rate below saturation.
  const latencies = [];
  const latencyCount = Number(latencyTotal);
  const timed = await phase('bench.lat', latencyCount, (message) => {
    latencies.push(now() - Number(message.content.toString()));
  });
  const interval = 1000 / Number(latencyRate);
  const start = now();
  for (let i = 0; i < latencyCount; i++) {
    const due = start + i * interval;
    const wait = due - now();
    if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait));
    sendConfirmed('bench.lat', String(now())).catch((err) => {
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
  await connection.close();
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
