//! A time limit for a command that may hang (the test suite): past it, the
//! watchdog prints where every test process is stuck, from `gdb` if the
//! machine has it, then kills the command's whole process group. A hung
//! test then fails the run in minutes with a backtrace, instead of using up
//! CI's time limit with nothing to show.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Frames of these crates are what a reader of a hang wants to see.
const OWN_FRAMES: [&str; 3] = ["wharf::", "integration::", "tests/integration/"];
/// At most this many of a thread's own frames are printed.
const FRAMES_PER_THREAD: usize = 8;

/// Runs `command` in a process group of its own; fails if it fails, or if
/// it is still running after `limit` (then reports and kills it).
pub fn run_with_limit(command: &mut Command, limit: Duration) -> Result<()> {
    eprintln!("xtask: running {command:?} (time limit {limit:?})");
    let mut child = command
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start {command:?}"))?;
    let group = child.id();
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().context("waiting for the command")? {
            if !status.success() {
                bail!("{command:?} failed with {status}");
            }
            return Ok(());
        }
        if started.elapsed() > limit {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    eprintln!("xtask: {command:?} is still running after {limit:?}; where it is stuck:");
    for pid in test_processes(group) {
        report_stacks(pid);
    }
    // The whole group: cargo, the test binaries and the servers they
    // started.
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{group}")])
        .status();
    let _ = child.wait();
    bail!("{command:?} did not finish within {limit:?} (a test hung; stacks above)")
}

/// The processes of process group `group` running a test binary (an
/// executable under a `deps` directory of a Cargo target directory).
fn test_processes(group: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| process_group(pid) == Some(group))
        .filter(|&pid| {
            std::fs::read_link(format!("/proc/{pid}/exe"))
                .is_ok_and(|exe| exe.parent().is_some_and(|dir| dir.ends_with("deps")))
        })
        .collect()
}

/// The process group of `pid`, from `/proc/PID/stat` (the fifth field,
/// counted after the parenthesised command name, which may hold spaces).
fn process_group(pid: u32) -> Option<u32> {
    group_in_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn group_in_stat(stat: &str) -> Option<u32> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(2)?.parse().ok()
}

/// Prints, for every thread of `pid` with frames of Wharf or its tests, the
/// thread's name and those frames.
fn report_stacks(pid: u32) {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
    eprintln!("xtask: process {pid} ({})", display_name(&exe));
    let output = Command::new("gdb")
        .args(["-p", &pid.to_string(), "-batch", "-nx"])
        .args(["-ex", "set pagination off", "-ex", "thread apply all bt"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output();
    let Ok(output) = output else {
        eprintln!("xtask:   (no gdb on this machine: no stacks)");
        return;
    };
    let text = String::from_utf8_lossy(&output.stdout);
    for (thread, frames) in own_frames(&text) {
        eprintln!("xtask:   {thread}");
        for frame in frames {
            eprintln!("xtask:     {frame}");
        }
    }
}

fn display_name(exe: &Path) -> String {
    exe.file_name()
        .map_or_else(|| "?".into(), |name| name.to_string_lossy().into_owned())
}

/// Splits `gdb`'s `thread apply all bt` output into threads, keeping those
/// with frames of our own code, and of each its first such frames.
fn own_frames(backtraces: &str) -> Vec<(String, Vec<String>)> {
    let mut threads: Vec<(String, Vec<String>)> = Vec::new();
    for line in backtraces.lines() {
        if line.starts_with("Thread ") {
            threads.push((line.trim().to_string(), Vec::new()));
        } else if line.starts_with('#')
            && OWN_FRAMES.iter().any(|own| line.contains(own))
            && let Some((_, frames)) = threads.last_mut()
            && frames.len() < FRAMES_PER_THREAD
        {
            frames.push(line.trim().to_string());
        }
    }
    threads.retain(|(_, frames)| !frames.is_empty());
    threads
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_threads_with_own_frames_are_kept() {
        let gdb = "\
Thread 3 (Thread 0x7f (LWP 12) \"tokio-runtime-w\"):
#0  0x1 in syscall () from /lib/libc.so.6
#1  0x2 in wharf::guest::worker::Worker::serve (self=0x3) at host/src/guest/worker.rs:250
#2  0x3 in integration::wasi_p3::hostile () at tests/integration/wasi_p3.rs:321

Thread 2 (Thread 0x7e (LWP 11) \"wharf-epoch\"):
#0  0x4 in clock_nanosleep () from /lib/libc.so.6
";
        let threads = own_frames(gdb);
        assert_eq!(threads.len(), 1);
        assert!(threads[0].0.contains("LWP 12"));
        assert_eq!(threads[0].1.len(), 2);
        assert!(threads[0].1[0].contains("worker.rs:250"));
    }

    #[test]
    fn the_process_group_is_read_after_a_name_with_spaces() {
        let stat = "4242 (tokio (worker) 1) S 4000 4100 4000 0 -1";
        assert_eq!(group_in_stat(stat), Some(4100));
        assert_eq!(group_in_stat("4242 (cut"), None);
    }
}
