//! Guest stdout and stderr: captured line by line into the host's log, tagged
//! with the service and request id, with a per-request byte budget so a
//! chatty or hostile guest cannot flood the log.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

use crate::guest::source_map::SourceMapper;

/// Bytes of output per stream and request that reach the log; the rest is
/// dropped (the guest is not told) after one "truncated" line.
pub const OUTPUT_BUDGET: usize = 64 * 1024;
/// Longest line logged; longer lines are split.
const MAX_LINE: usize = 4 * 1024;

/// Which standard stream a guest wrote to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// The guest's stdout.
    Stdout,
    /// The guest's stderr.
    Stderr,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// A guest's stdout or stderr: what WASI writes into. Clones share the
/// line buffer, so the host can retag it when an instance is reused.
#[derive(Clone)]
pub(crate) struct GuestOutput {
    lines: Arc<Mutex<LineLog>>,
}

impl GuestOutput {
    /// The output of `service`'s request `request_id` on `stream`; stack
    /// frames in it are rewritten through `source_map`, if the component
    /// carries one.
    pub(crate) fn new(
        stream: Stream,
        service: Arc<str>,
        request_id: Arc<str>,
        source_map: Option<Arc<SourceMapper>>,
    ) -> GuestOutput {
        GuestOutput {
            lines: Arc::new(Mutex::new(LineLog {
                stream,
                service,
                request_id,
                source_map,
                pending: Vec::new(),
                logged: 0,
                truncated: false,
            })),
        }
    }

    /// Starts the output of another request on the same instance: flushes
    /// what is pending under the old request id, then tags lines with the
    /// new one, with a fresh budget.
    pub(crate) fn begin_request(&self, request_id: Arc<str>) {
        let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        if !lines.pending.is_empty() {
            lines.emit();
        }
        lines.request_id = request_id;
        lines.logged = 0;
        lines.truncated = false;
    }
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(LineWriter {
            lines: self.lines.clone(),
        })
    }
}

struct LineWriter {
    lines: Arc<Mutex<LineLog>>,
}

impl AsyncWrite for LineWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        // A poisoned lock only means another writer panicked mid-line; the
        // buffered text is still valid bytes.
        let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        lines.write(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Splits output into lines and logs each, within the budget.
struct LineLog {
    stream: Stream,
    service: Arc<str>,
    request_id: Arc<str>,
    /// Where the guest's stack frames really point.
    source_map: Option<Arc<SourceMapper>>,
    pending: Vec<u8>,
    logged: usize,
    truncated: bool,
}

impl LineLog {
    fn write(&mut self, buf: &[u8]) {
        for segment in buf.split_inclusive(|&b| b == b'\n') {
            if self.truncated {
                return;
            }
            let (mut text, ends_line) = match segment.strip_suffix(b"\n") {
                Some(text) => (text, true),
                None => (segment, false),
            };
            let blank_line = text.is_empty();
            while !text.is_empty() && !self.truncated {
                let take = text.len().min(MAX_LINE - self.pending.len());
                self.pending.extend_from_slice(&text[..take]);
                text = &text[take..];
                if self.pending.len() >= MAX_LINE {
                    self.emit();
                }
            }
            if self.truncated {
                self.pending.clear();
                return;
            }
            if ends_line && (blank_line || !self.pending.is_empty()) {
                self.emit();
            }
        }
    }

    fn emit(&mut self) {
        let line = std::mem::take(&mut self.pending);
        if self.truncated {
            return;
        }
        self.logged += line.len() + 1;
        if self.logged > OUTPUT_BUDGET {
            self.truncated = true;
            tracing::warn!(
                target: "wharf::guest",
                service = %self.service,
                request_id = %self.request_id,
                stream = self.stream.name(),
                "guest output over {OUTPUT_BUDGET} bytes for this request; the rest is dropped"
            );
            return;
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches('\r');
        let text = match &self.source_map {
            Some(map) => map.rewrite(text),
            None => std::borrow::Cow::Borrowed(text),
        };
        tracing::info!(
            target: "wharf::guest",
            service = %self.service,
            request_id = %self.request_id,
            stream = self.stream.name(),
            "{text}"
        );
    }
}

impl Drop for LineLog {
    fn drop(&mut self) {
        if !self.pending.is_empty() {
            self.emit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log() -> LineLog {
        LineLog {
            stream: Stream::Stdout,
            service: "svc".into(),
            request_id: "r1".into(),
            source_map: None,
            pending: Vec::new(),
            logged: 0,
            truncated: false,
        }
    }

    #[test]
    fn lines_are_split_and_counted() {
        let mut l = log();
        l.write(b"one\ntwo\nthr");
        assert_eq!(l.logged, 8);
        assert_eq!(l.pending, b"thr");
        l.write(b"ee\n");
        assert_eq!(l.logged, 14);
        assert!(l.pending.is_empty());
    }

    #[test]
    fn long_lines_are_cut_and_budget_truncates() {
        let mut l = log();
        l.write(&vec![b'x'; MAX_LINE * 3 + 10]);
        assert_eq!(l.pending.len(), 10);
        assert_eq!(l.logged, (MAX_LINE + 1) * 3);
        l.write(&vec![b'y'; OUTPUT_BUDGET * 2]);
        assert!(l.truncated);
        l.write(b"more\n");
        assert!(l.pending.is_empty());
    }
}
