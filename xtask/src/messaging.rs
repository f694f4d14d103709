//! `cargo xtask bench messaging`: messages published → handled by a trivial
//! handler, on each broker (embedded, NATS JetStream, RabbitMQ, Kafka),
//! beside a Node.js consumer using `amqplib` on the same RabbitMQ and one
//! using `kafkajs` on the same Kafka-API broker (tansu), doing the same
//! work (the seed's stack).
//!
//! Each handler runs in a fresh instance per message (Wharf's default),
//! and once more on the embedded broker with `[instance] reuse`, to show
//! what the fresh instance costs; the embedded broker and NATS run once
//! more with message bodies encrypted at rest (`--encryption-key`), and NATS
//! once more over TLS (a TLS-only `nats-server`, a CA the bench makes), to
//! show what sealing and TLS cost.
//!
//! Two phases per target:
//! - **throughput**: `MESSAGES` published by `PUBLISHERS` concurrent
//!   publishers (in Wharf: guest requests publishing 500 messages each
//!   through `wasi:messaging`, each publish confirmed by the broker),
//!   timed from the first publish to the last message acknowledged after
//!   its handler (a guest answering 200) ran;
//! - **latency**: `LATENCY_MESSAGES` published at a steady rate below
//!   saturation, each stamped with its publish time (wall clock, in the
//!   publishing guest); the handler logs the difference.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::daemon::{Daemon, free_port, start_nats, start_tansu, wait_for};
use crate::process::WharfProcess;
use crate::{root, run, system};

/// Messages in the throughput phase.
const MESSAGES: usize = 30_000;
/// Concurrent publishers.
const PUBLISHERS: usize = 8;
/// Messages each Wharf publishing request sends.
const PER_REQUEST: usize = 500;
/// Messages in the latency phase, and their rate.
const LATENCY_MESSAGES: usize = 2_000;
const LATENCY_RATE: u64 = 500;

/// A RabbitMQ broker of the bench's own: its own `epmd` and node on free
/// ports, data in a temporary directory.
fn start_rabbitmq() -> Result<(Daemon, String)> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("plugins"), "[].")?;
    let (port, epmd_port, dist_port) = (free_port()?, free_port()?, free_port()?);
    let epmd = Command::new("epmd")
        .args(["-port", &epmd_port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting epmd")?;
    let mut daemon = Daemon {
        children: vec![epmd],
        dir,
    };
    wait_for(epmd_port, "epmd", Duration::from_secs(10))?;
    let path = daemon.dir.path().to_path_buf();
    let broker = Command::new("/usr/lib/rabbitmq/bin/rabbitmq-server")
        .env("RUNNING_UNDER_SYSTEMD", "true")
        .env("HOME", &path)
        .env("RABBITMQ_NODENAME", format!("wharf-bench-{port}@localhost"))
        .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
        .env("RABBITMQ_NODE_PORT", port.to_string())
        .env("RABBITMQ_DIST_PORT", dist_port.to_string())
        .env("ERL_EPMD_PORT", epmd_port.to_string())
        .env("RABBITMQ_MNESIA_BASE", path.join("mnesia"))
        .env("RABBITMQ_LOG_BASE", path.join("log"))
        .env("RABBITMQ_ENABLED_PLUGINS_FILE", path.join("plugins"))
        .env("RABBITMQ_CONFIG_FILE", path.join("none"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting rabbitmq-server")?;
    daemon.children.push(broker);
    wait_for(port, "rabbitmq-server", Duration::from_secs(120))?;
    Ok((daemon, format!("amqp://guest:guest@127.0.0.1:{port}/%2f")))
}

/// The Node.js bench in `xtask/peers/PEER` (`amqp`, `kafka`), with its npm
/// package `package` installed.
fn node_consumer(peer: &str, package: &str) -> Result<PathBuf> {
    system::ensure(&[&system::NODE, &system::NPM])?;
    let dir = root().join("xtask").join("peers").join(peer);
    if !dir.join("node_modules").join(package).exists() {
        run(Command::new("npm")
            .current_dir(&dir)
            .args(["ci", "--no-audit", "--no-fund"]))?;
    }
    Ok(dir.join("bench.js"))
}

/// One measured target.
struct Measured {
    label: String,
    throughput: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Percentile `p` of sorted samples.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Counts `latency_us=` lines in the host's log.
fn latencies(wharf: &WharfProcess) -> Vec<f64> {
    let mut samples: Vec<f64> = wharf
        .log_lines_containing("latency_us=")
        .iter()
        .filter_map(|line| {
            let at = line.find("latency_us=")? + "latency_us=".len();
            let digits: String = line[at..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse::<f64>().ok()
        })
        .map(|us| us / 1000.0)
        .collect();
    samples.sort_by(f64::total_cmp);
    samples
}

/// How a Wharf row differs from the plain one.
#[derive(Clone, PartialEq, Eq)]
enum Variant {
    /// Defaults: a fresh instance per message, bodies stored as they are.
    Plain,
    /// The handler reuses its instance (`[instance] reuse`).
    Reuse,
    /// Message bodies (and values) encrypted at rest (`--encryption-key`).
    Encrypted,
    /// TLS to the broker, verified against the bench's CA
    /// (`--backend-tls-ca`).
    Tls,
}

/// Measures one Wharf host on `broker`, as `label`, set up as `variant`
/// says.
fn measure_wharf(
    wharf_bin: &Path,
    guests: &Path,
    label: &str,
    broker: &str,
    variant: &Variant,
    ca: &str,
) -> Result<Measured> {
    let reuse = *variant == Variant::Reuse;
    let services = tempfile::tempdir()?;
    let data = tempfile::tempdir()?;
    let keys = tempfile::tempdir()?;
    let key = keys.path().join("wharf.key");
    std::fs::write(&key, "5a".repeat(32))?;
    let key = key.display().to_string();
    let messenger = guests.join("messenger.wasm");
    for name in ["pub", "lat"] {
        std::fs::copy(&messenger, services.path().join(format!("{name}.wasm")))?;
    }
    // The trivial handler: the smallest guest, answering 200.
    std::fs::copy(guests.join("hello.wasm"), services.path().join("sink.wasm"))?;
    std::fs::write(
        services.path().join("pub.toml"),
        "[messaging]\npublish = [\"bench.>\"]\n[limits]\ntimeout = \"120s\"\n",
    )?;
    std::fs::write(
        services.path().join("sink.toml"),
        format!(
            "[messaging]\nsubscribe = [\"bench.t\"]\n[[trigger.message]]\ntopic = \"bench.t\"\npath = \"/\"\n{}",
            if reuse {
                "[instance]\nreuse = 10000\n"
            } else {
                ""
            }
        ),
    )?;
    std::fs::write(
        services.path().join("lat.toml"),
        "[messaging]\nsubscribe = [\"bench.lat\"]\n[[trigger.message]]\ntopic = \"bench.lat\"\npath = \"/latency\"\n",
    )?;
    let data_path = data.path().display().to_string();
    let mut args = vec![
        "--log",
        "error,wharf::guest=info",
        "--broker",
        broker,
        "--data-dir",
        &data_path,
        "--max-pending-messages",
        "1000000",
        "--admin",
        "127.0.0.1:0",
    ];
    match variant {
        Variant::Encrypted => args.extend(["--encryption-key", key.as_str()]),
        Variant::Tls => args.extend(["--backend-tls-ca", ca]),
        Variant::Plain | Variant::Reuse => {}
    }
    let wharf = WharfProcess::start(wharf_bin, services.path(), &args)?;

    // Throughput.
    let handled_before = handled(&wharf, "sink")?;
    let started = Instant::now();
    let requests = MESSAGES / PER_REQUEST;
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| -> Result<()> {
        let workers: Vec<_> = (0..PUBLISHERS)
            .map(|_| {
                scope.spawn(|| -> Result<()> {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= requests {
                            return Ok(());
                        }
                        let url = wharf.url(&format!(
                            "/pub/publish?topic=bench.t&n={PER_REQUEST}&prefix=r{i}-"
                        ));
                        let response = ureq::post(&url).send_empty().context("publishing")?;
                        if response.status() != 200 {
                            bail!("publishing answered {}", response.status());
                        }
                    }
                })
            })
            .collect();
        for worker in workers {
            worker
                .join()
                .map_err(|_| anyhow::anyhow!("a publisher panicked"))??;
        }
        Ok(())
    })?;
    let target = handled_before + MESSAGES as u64;
    let deadline = Instant::now() + Duration::from_secs(300);
    while handled(&wharf, "sink")? < target {
        if Instant::now() > deadline {
            bail!("{label}: the handler did not get every message within 5 minutes");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let throughput = MESSAGES as f64 / started.elapsed().as_secs_f64();

    // Latency at a steady rate.
    let interval = Duration::from_nanos(1_000_000_000 / LATENCY_RATE);
    let start = Instant::now();
    let url = wharf.url("/pub/publish?topic=bench.lat&stamp=1");
    for i in 0..LATENCY_MESSAGES {
        let due = start + interval * i as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        ureq::post(&url).send_empty().context("publishing")?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while latencies(&wharf).len() < LATENCY_MESSAGES {
        if Instant::now() > deadline {
            bail!("{label}: the latency handler did not get every message");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let samples = latencies(&wharf);
    Ok(Measured {
        label: label.to_string(),
        throughput,
        p50_ms: percentile(&samples, 50.0),
        p99_ms: percentile(&samples, 99.0),
    })
}

/// `wharf_messages_handled_total{service=SERVICE,…,outcome="acked"}`.
fn handled(wharf: &WharfProcess, service: &str) -> Result<u64> {
    let text = ureq::get(&wharf.admin_url("/metrics")?)
        .call()
        .context("reading metrics")?
        .into_body()
        .read_to_string()
        .context("reading metrics")?;
    let prefix = format!("wharf_messages_handled_total{{service=\"{service}\"");
    Ok(text
        .lines()
        .filter(|line| line.starts_with(&prefix) && line.contains("outcome=\"acked\""))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64)
}

/// Measures the Node.js consumer `script` on `url`, as `label`.
fn measure_node(script: &Path, url: &str, label: &str) -> Result<Measured> {
    let output = Command::new("node")
        .arg(script)
        .args([
            url,
            &MESSAGES.to_string(),
            &PUBLISHERS.to_string(),
            &LATENCY_MESSAGES.to_string(),
            &LATENCY_RATE.to_string(),
        ])
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !output.status.success() {
        bail!(
            "the Node.js bench failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let field = |name: &str| -> Result<f64> {
        let at = text
            .find(&format!("\"{name}\":"))
            .with_context(|| format!("no {name} in {text}"))?
            + name.len()
            + 3;
        let number: String = text[at..]
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == 'e' || *c == '-')
            .collect();
        number.parse().with_context(|| format!("{name} in {text}"))
    };
    Ok(Measured {
        label: label.into(),
        throughput: field("throughput")?,
        p50_ms: field("p50_ms")?,
        p99_ms: field("p99_ms")?,
    })
}

/// The broker a row runs on.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Broker {
    Embedded,
    Nats,
    NatsTls,
    RabbitMq,
    /// tansu, started afresh for each row: a run that leaves a backlog
    /// behind must not slow the next one down.
    Kafka,
}

/// Who consumes in a row.
enum Consumer {
    Wharf(Variant),
    /// The Node.js bench in `xtask/peers/PEER`, with its npm package.
    Node {
        peer: &'static str,
        package: &'static str,
    },
}

/// One row of the report.
struct Target {
    label: &'static str,
    broker: Broker,
    consumer: Consumer,
}

/// Every row, in the report's order.
fn targets() -> Vec<Target> {
    let wharf = |label, broker, variant| Target {
        label,
        broker,
        consumer: Consumer::Wharf(variant),
    };
    let node = |label, broker, peer, package| Target {
        label,
        broker,
        consumer: Consumer::Node { peer, package },
    };
    vec![
        wharf("Wharf, embedded broker", Broker::Embedded, Variant::Plain),
        wharf(
            "Wharf, embedded broker, bodies encrypted at rest",
            Broker::Embedded,
            Variant::Encrypted,
        ),
        wharf(
            "Wharf, embedded broker, handler reusing its instance",
            Broker::Embedded,
            Variant::Reuse,
        ),
        wharf("Wharf, NATS JetStream", Broker::Nats, Variant::Plain),
        wharf(
            "Wharf, NATS JetStream, bodies encrypted at rest",
            Broker::Nats,
            Variant::Encrypted,
        ),
        wharf(
            "Wharf, NATS JetStream over TLS (`tls://`)",
            Broker::NatsTls,
            Variant::Tls,
        ),
        wharf("Wharf, RabbitMQ", Broker::RabbitMq, Variant::Plain),
        node(
            "Node.js + amqplib on RabbitMQ",
            Broker::RabbitMq,
            "amqp",
            "amqplib",
        ),
        wharf(
            "Wharf, Kafka API (tansu 0.6, SQLite)",
            Broker::Kafka,
            Variant::Plain,
        ),
        node(
            "Node.js + kafkajs on the Kafka API (tansu 0.6, SQLite)",
            Broker::Kafka,
            "kafka",
            "kafkajs",
        ),
    ]
}

/// The brokers the selected rows need, each started on first use; NATS and
/// RabbitMQ are shared by the rows on them, tansu is one per row.
struct Brokers {
    pki: tempfile::TempDir,
    nats: Option<(Daemon, String)>,
    nats_tls: Option<(Daemon, String)>,
    rabbitmq: Option<(Daemon, String)>,
}

impl Brokers {
    fn new() -> Result<Self> {
        let pki = tempfile::tempdir()?;
        crate::daemon::write_pki(pki.path())?;
        Ok(Self {
            pki,
            nats: None,
            nats_tls: None,
            rabbitmq: None,
        })
    }

    /// The CA the TLS brokers' certificates are signed with.
    fn ca(&self) -> String {
        self.pki.path().join("ca.pem").display().to_string()
    }

    /// The address of `broker`, and the row's own daemon if it has one.
    fn address(&mut self, broker: Broker) -> Result<(String, Option<Daemon>)> {
        fn shared(
            slot: &mut Option<(Daemon, String)>,
            start: impl FnOnce() -> Result<(Daemon, String)>,
        ) -> Result<String> {
            let (_, url) = match slot {
                Some(started) => started,
                None => slot.insert(start()?),
            };
            Ok(url.clone())
        }
        Ok(match broker {
            Broker::Embedded => ("embedded".into(), None),
            Broker::Nats => (shared(&mut self.nats, start_nats)?, None),
            Broker::NatsTls => {
                let pki = self.pki.path().to_path_buf();
                let url = shared(&mut self.nats_tls, || crate::daemon::start_nats_tls(&pki))?;
                (url, None)
            }
            Broker::RabbitMq => {
                let url = shared(&mut self.rabbitmq, || {
                    eprintln!("xtask: starting RabbitMQ (about 15 s)");
                    start_rabbitmq()
                })?;
                (url, None)
            }
            Broker::Kafka => {
                let (daemon, url) = start_tansu()?;
                (url, Some(daemon))
            }
        })
    }
}

/// Measures one row.
fn measure(
    target: &Target,
    brokers: &mut Brokers,
    wharf_bin: &Path,
    guests: &Path,
) -> Result<Measured> {
    let (address, _own_broker) = brokers.address(target.broker)?;
    match &target.consumer {
        Consumer::Wharf(variant) => {
            let ca = brokers.ca();
            measure_wharf(wharf_bin, guests, target.label, &address, variant, &ca)
        }
        Consumer::Node { peer, package } => {
            let script = node_consumer(peer, package)?;
            // The Node clients take a bare HOST:PORT for Kafka.
            let address = address.trim_start_matches("kafka://");
            measure_node(&script, address, target.label)
        }
    }
}

/// Runs the bench (the rows whose label contains `only`, any case, if
/// given) and writes `messaging.md` into `out_dir`.
pub fn run_bench(
    wharf_bin: &Path,
    guests: &Path,
    out_dir: &Path,
    only: Option<&str>,
) -> Result<()> {
    system::ensure(&[&system::NATS, &system::RABBITMQ])?;
    let only = only.map(str::to_lowercase);
    let selected: Vec<Target> = targets()
        .into_iter()
        .filter(|target| {
            only.as_ref()
                .is_none_or(|only| target.label.to_lowercase().contains(only))
        })
        .collect();
    if selected.is_empty() {
        bail!("no bench messaging row matches --only {only:?}");
    }
    let mut brokers = Brokers::new()?;
    let mut rows = Vec::new();
    let mut failed = Vec::new();
    for target in &selected {
        eprintln!("xtask: measuring {}", target.label);
        match measure(target, &mut brokers, wharf_bin, guests) {
            Ok(row) => {
                eprintln!("xtask: {}: {:.0} messages/s", row.label, row.throughput);
                rows.push(row);
            }
            // One broker failing must not lose the others' rows: the
            // report says what failed.
            Err(err) => failed.push((target.label.to_string(), format!("{err:#}"))),
        }
    }

    let mut report = String::new();
    let _ = writeln!(
        report,
        "Messaging: {MESSAGES} messages published by {PUBLISHERS} concurrent publishers → a trivial handler \
         (acknowledged after it ran); latency: {LATENCY_MESSAGES} messages at {LATENCY_RATE}/s, publish → handler.\n"
    );
    let _ = writeln!(report, "| target | messages/s | p50 ms | p99 ms |");
    let _ = writeln!(report, "| --- | --- | --- | --- |");
    for row in &rows {
        let _ = writeln!(
            report,
            "| {} | {:.0} | {:.2} | {:.2} |",
            row.label, row.throughput, row.p50_ms, row.p99_ms
        );
    }
    for (label, why) in &failed {
        let _ = writeln!(report, "| {label} | failed: {why} | | |");
    }
    println!("{report}");
    std::fs::create_dir_all(out_dir)?;
    std::fs::write(out_dir.join("messaging.md"), &report)?;
    Ok(())
}
