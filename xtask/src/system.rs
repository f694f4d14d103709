//! Tools from the operating system the builds and benchmarks need (Node.js
//! and npm, Python's venv, wrk): found on the PATH, or installed with
//! `apt-get` on Debian-like machines (as root, or through sudo).

use std::process::Command;

use anyhow::{Result, bail};

use crate::run;

/// A program the build needs, and the Debian packages that provide it.
pub struct Tool {
    /// What to run to tell whether it is there (program and arguments).
    pub probe: &'static [&'static str],
    /// Debian packages to install if the probe fails.
    pub packages: &'static [&'static str],
    /// What to tell the user when it cannot be installed.
    pub hint: &'static str,
}

/// Node.js and npm, for the ComponentizeJS builds and the Express peer.
pub const NODE: Tool = Tool {
    probe: &["node", "--version"],
    packages: &["nodejs"],
    hint: "install Node.js 18 or newer",
};
/// npm, which Debian packages apart from Node.js.
pub const NPM: Tool = Tool {
    probe: &["npm", "--version"],
    packages: &["npm"],
    hint: "install npm",
};
/// Python 3 with a working `venv` (and pip), for componentize-py.
pub const PYTHON_VENV: Tool = Tool {
    probe: &["python3", "-c", "import venv, ensurepip"],
    packages: &["python3", "python3-venv"],
    hint: "install Python 3.9 or newer with the venv module",
};
/// Redis, for the key-value backend tests (each test starts its own server).
pub const REDIS: Tool = Tool {
    probe: &["redis-server", "--version"],
    packages: &["redis-server"],
    hint: "install Redis (redis-server)",
};
/// NATS with JetStream, for the key-value and messaging backend tests.
pub const NATS: Tool = Tool {
    probe: &["nats-server", "--version"],
    packages: &["nats-server"],
    hint: "install the NATS server (nats-server)",
};
/// RabbitMQ, for the messaging backend tests and the messaging benchmark.
/// The tests run the broker script directly (not the service wrapper), so
/// the probe is that script being there.
pub const RABBITMQ: Tool = Tool {
    probe: &["test", "-x", "/usr/lib/rabbitmq/bin/rabbitmq-server"],
    packages: &["rabbitmq-server"],
    hint: "install RabbitMQ (rabbitmq-server)",
};
/// HAProxy, the load balancer in front of the cluster test's hosts.
pub const HAPROXY: Tool = Tool {
    probe: &["haproxy", "-v"],
    packages: &["haproxy"],
    hint: "install HAProxy (haproxy)",
};
/// Chromium and ChromeDriver, for the dashboard's browser test.
pub const CHROMIUM: Tool = Tool {
    probe: &["chromedriver", "--version"],
    packages: &["chromium", "chromium-driver"],
    hint: "install Chromium and ChromeDriver (chromium, chromium-driver)",
};
/// OpenSSL's headers and pkg-config: librdkafka (Wharf's Kafka client)
/// is built against them for TLS and SASL/SCRAM.
pub const OPENSSL_DEV: Tool = Tool {
    probe: &["pkg-config", "--exists", "openssl"],
    packages: &["libssl-dev", "pkg-config"],
    hint: "install OpenSSL's development files and pkg-config (libssl-dev, pkg-config)",
};
/// The HTTP load generator the benchmarks drive.
pub const WRK: Tool = Tool {
    probe: &["wrk", "--version"],
    packages: &["wrk"],
    hint: "install wrk",
};

fn present(tool: &Tool) -> bool {
    // wrk prints its version and exits 1; that it ran at all is enough.
    // Debian puts some servers in /usr/sbin, which a user's PATH may lack.
    let (program, args) = (tool.probe[0], &tool.probe[1..]);
    [program.to_string(), format!("/usr/sbin/{program}")]
        .iter()
        .any(
            |candidate| match Command::new(candidate).args(args).output() {
                Ok(output) => output.status.success() || program == "wrk",
                Err(_) => false,
            },
        )
}

/// Makes sure every tool in `tools` is there, installing the missing ones
/// with one `apt-get install` when the machine has apt-get.
pub fn ensure(tools: &[&Tool]) -> Result<()> {
    let missing: Vec<&Tool> = tools
        .iter()
        .copied()
        .filter(|tool| !present(tool))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let packages: Vec<&str> = missing
        .iter()
        .flat_map(|tool| tool.packages)
        .copied()
        .collect();
    let names = missing
        .iter()
        .map(|t| t.probe[0])
        .collect::<Vec<_>>()
        .join(", ");
    if Command::new("apt-get").arg("--version").output().is_err() {
        let hints = missing
            .iter()
            .map(|t| t.hint)
            .collect::<Vec<_>>()
            .join("; ");
        bail!("{names} missing and this machine has no apt-get: {hints}");
    }
    eprintln!(
        "xtask: {names} missing; installing {} with apt-get",
        packages.join(" ")
    );
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    let apt = |args: &[&str]| {
        let mut command = if root {
            Command::new("apt-get")
        } else {
            let mut sudo = Command::new("sudo");
            sudo.arg("apt-get");
            sudo
        };
        command.env("DEBIAN_FRONTEND", "noninteractive").args(args);
        command
    };
    run(&mut apt(&["update", "-q"]))?;
    let mut install = apt(&["install", "-y", "-q", "--no-install-recommends"]);
    install.args(&packages);
    run(&mut install)?;
    for tool in missing {
        if !present(tool) {
            bail!(
                "{} still missing after apt-get: {}",
                tool.probe[0],
                tool.hint
            );
        }
    }
    Ok(())
}
