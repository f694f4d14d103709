//! Driving HTTP load with `wrk` (from Debian's packages) and reading its
//! report: requests per second and latency percentiles.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

/// One wrk run's results.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadResult {
    /// Requests per second.
    pub rps: f64,
    /// Median latency in milliseconds.
    pub p50_ms: f64,
    /// 99th-percentile latency in milliseconds.
    pub p99_ms: f64,
    /// Responses that were not 2xx/3xx, plus socket errors.
    pub errors: u64,
}

/// Load parameters.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// wrk threads.
    pub threads: u32,
    /// Open connections.
    pub connections: u32,
    /// How long to run.
    pub duration: Duration,
}

/// Makes sure wrk is installed (with apt-get if it is missing).
pub fn require_wrk() -> Result<()> {
    crate::system::ensure(&[&crate::system::WRK])
}

/// Runs wrk against `url`.
pub fn run(url: &str, load: Load) -> Result<LoadResult> {
    let output = Command::new("wrk")
        .arg(format!("-t{}", load.threads))
        .arg(format!("-c{}", load.connections))
        .arg(format!("-d{}s", load.duration.as_secs().max(1)))
        .arg("--latency")
        .arg(url)
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "wrk failed: {text}{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    parse(&text).with_context(|| format!("reading wrk's report:\n{text}"))
}

fn parse(text: &str) -> Result<LoadResult> {
    let mut result = LoadResult::default();
    for line in text.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("Requests/sec:"), Some(rps)) => result.rps = rps.parse()?,
            (Some("50%"), Some(latency)) => result.p50_ms = millis(latency)?,
            (Some("99%"), Some(latency)) => result.p99_ms = millis(latency)?,
            (Some("Non-2xx"), _) => {
                result.errors += line.rsplit(' ').next().unwrap_or("0").parse::<u64>()?;
            }
            (Some("Socket"), Some("errors:")) => {
                for part in line.split(',') {
                    if let Some(n) = part.split_whitespace().last() {
                        result.errors += n.parse::<u64>().unwrap_or(0);
                    }
                }
            }
            _ => {}
        }
    }
    if result.rps == 0.0 {
        bail!("no Requests/sec line");
    }
    Ok(result)
}

/// wrk prints latencies as `812.00us`, `1.23ms` or `2.01s`.
fn millis(text: &str) -> Result<f64> {
    let (number, factor) = if let Some(n) = text.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1000.0)
    } else {
        bail!("unknown latency unit in {text:?}");
    };
    Ok(number.parse::<f64>()? * factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_wrk_report() {
        let report = "Running 8s test @ http://127.0.0.1:8181/hello
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     5.86ms    3.75ms  47.27ms   84.03%
  Latency Distribution
     50%    5.12ms
     75%    7.01ms
     90%    9.80ms
     99%   19.44ms
  46331 requests in 8.00s, 8.97MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 5
Requests/sec:   5791.42
Transfer/sec:      1.12MB
";
        let r = parse(report).unwrap();
        assert_eq!(r.rps, 5791.42);
        assert_eq!(r.p50_ms, 5.12);
        assert_eq!(r.p99_ms, 19.44);
        assert_eq!(r.errors, 8);
        assert_eq!(millis("812.00us").unwrap(), 0.812);
        assert_eq!(millis("2.00s").unwrap(), 2000.0);
    }
}
