//! Who may talk to the admin endpoint, decided before any route runs:
//!
//! - **Host.** A browser on the operator's machine can be made to reach a
//!   loopback admin endpoint through a DNS name that points there (DNS
//!   rebinding). The endpoint answers only requests whose `Host` (or
//!   HTTP/2 authority) is an IP literal, `localhost`, or a name the operator
//!   allowed (`--admin-host`); any other gets 421.
//! - **Token.** Writes, and reads that show what guests printed or sent,
//!   need the bearer token. It is compared as SHA-256 digests, in constant
//!   time, so neither its content nor its length leaks through timing.
//! - **Failures.** Each client address (IPv6: its /64) may fail
//!   [`FAILURES_PER_MINUTE`] times a minute; past that it gets 429 with
//!   `Retry-After` before its token is even looked at, so guessing runs at
//!   that pace, not at the endpoint's request rate. Every counted failure
//!   is logged with its address; a blocked address is logged once per
//!   block.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::HeaderValue;
use sha2::{Digest as _, Sha256};

/// Failed authentications one client address may make per minute.
pub const FAILURES_PER_MINUTE: u32 = 10;
/// Client addresses whose failures are remembered at once; past it, new
/// addresses share one budget.
const MAX_TRACKED: usize = 10_000;

/// The bearer token that authorises admin writes.
#[derive(Clone)]
pub struct AdminToken {
    /// SHA-256 of the token: what requests are compared against.
    digest: [u8; 32],
}

impl AdminToken {
    /// A token; leading and trailing whitespace is ignored. Empty is refused.
    pub fn new(token: &str) -> anyhow::Result<AdminToken> {
        let token = token.trim();
        anyhow::ensure!(!token.is_empty(), "the admin token is empty");
        Ok(AdminToken {
            digest: Sha256::digest(token.as_bytes()).into(),
        })
    }

    /// Whether an `Authorization` header value carries this token. Both
    /// sides are hashed first and the digests compared in constant time.
    pub fn accepts(&self, header: Option<&HeaderValue>) -> bool {
        let Some(given) = header
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        else {
            return false;
        };
        let given: [u8; 32] = Sha256::digest(given.trim().as_bytes()).into();
        given
            .iter()
            .zip(&self.digest)
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(…)")
    }
}

/// What a request's credentials come to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credentials {
    /// The right token.
    Valid,
    /// The host has no token: writes are off, reads are open.
    NoTokenConfigured,
    /// No token, or a wrong one (a wrong one counted as a failure).
    Refused,
    /// This address failed too often: try again after this long.
    Blocked(Duration),
}

/// The admin endpoint's gate: allowed host names, the token, and the
/// failure budget per client address.
#[derive(Clone, Debug)]
pub struct AdminGuard {
    token: Option<AdminToken>,
    /// Lower-case host names (without port) allowed besides IP literals and
    /// `localhost`.
    hosts: Arc<[String]>,
    failures: Arc<Mutex<Failures>>,
}

impl AdminGuard {
    /// A gate with `token` (none: writes disabled) that also answers to the
    /// host names in `hosts`.
    pub fn new(token: Option<AdminToken>, hosts: &[String]) -> AdminGuard {
        AdminGuard {
            token,
            hosts: hosts
                .iter()
                .map(|host| host.trim().trim_end_matches('.').to_ascii_lowercase())
                .collect(),
            failures: Arc::new(Mutex::new(Failures::default())),
        }
    }

    /// Whether a token is configured.
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// Whether `authority` (a `Host` header or HTTP/2 authority; `None`:
    /// neither was sent) names this endpoint: an IP literal, `localhost`, or
    /// an allowed name. A request without any is an HTTP/1.0 tool's, not a
    /// browser's, and passes.
    pub fn allows_host(&self, authority: Option<&str>) -> bool {
        let Some(authority) = authority else {
            return true;
        };
        let Ok(authority) = authority.parse::<http::uri::Authority>() else {
            return false;
        };
        let host = authority.host();
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if bare.parse::<IpAddr>().is_ok() {
            return true;
        }
        let name = host.trim_end_matches('.').to_ascii_lowercase();
        name == "localhost" || self.hosts.contains(&name)
    }

    /// What the `Authorization` header of a request from `peer` comes to,
    /// counting a failure against the address.
    pub fn check(&self, header: Option<&HeaderValue>, peer: IpAddr) -> Credentials {
        let Some(token) = &self.token else {
            return Credentials::NoTokenConfigured;
        };
        let now = Instant::now();
        let key = address_key(peer);
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(wait) = failures.blocked(key, now) {
            return Credentials::Blocked(wait);
        }
        if token.accepts(header) {
            return Credentials::Valid;
        }
        if header.is_none() {
            // No attempt at all (an anonymous read): nothing guessed.
            return Credentials::Refused;
        }
        failures.count(key, now);
        drop(failures);
        tracing::warn!(
            client = %peer,
            "admin request refused: wrong bearer token"
        );
        Credentials::Refused
    }
}

/// The address failures are counted under: IPv4 as it is, IPv6 by its /64
/// (one host can hold a whole /64).
fn address_key(peer: IpAddr) -> IpAddr {
    match peer {
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let mut segments = v6.segments();
            segments[4..].fill(0);
            IpAddr::V6(segments.into())
        }
        v4 => v4,
    }
}

/// Failure budgets: tokens refilled at [`FAILURES_PER_MINUTE`] a minute.
#[derive(Debug, Default)]
struct Failures {
    by_address: HashMap<IpAddr, Budget>,
    /// Shared by addresses that arrive while `by_address` is full.
    overflow: Option<Budget>,
}

#[derive(Debug, Clone, Copy)]
struct Budget {
    tokens: f64,
    at: Instant,
    /// Whether the current block has been logged.
    logged: bool,
}

impl Budget {
    fn full(now: Instant) -> Budget {
        Budget {
            tokens: f64::from(FAILURES_PER_MINUTE),
            at: now,
            logged: false,
        }
    }

    fn refill(&mut self, now: Instant) {
        let per_second = f64::from(FAILURES_PER_MINUTE) / 60.0;
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * per_second).min(f64::from(FAILURES_PER_MINUTE));
        self.at = now;
    }

    /// How long until one failure may be counted again, if none may now.
    fn wait(&self) -> Option<Duration> {
        (self.tokens < 1.0).then(|| {
            let per_second = f64::from(FAILURES_PER_MINUTE) / 60.0;
            Duration::from_secs_f64((1.0 - self.tokens) / per_second)
        })
    }
}

impl Failures {
    fn budget(&mut self, key: IpAddr, now: Instant) -> &mut Budget {
        if !self.by_address.contains_key(&key) && self.by_address.len() >= MAX_TRACKED {
            // Forget addresses whose budget refilled; share one if none did.
            self.by_address.retain(|_, budget| {
                budget.refill(now);
                budget.tokens < f64::from(FAILURES_PER_MINUTE)
            });
            if self.by_address.len() >= MAX_TRACKED {
                return self.overflow.get_or_insert_with(|| Budget::full(now));
            }
        }
        self.by_address
            .entry(key)
            .or_insert_with(|| Budget::full(now))
    }

    fn blocked(&mut self, key: IpAddr, now: Instant) -> Option<Duration> {
        let budget = self.budget(key, now);
        budget.refill(now);
        let wait = budget.wait();
        match wait {
            Some(_) if !budget.logged => {
                budget.logged = true;
                tracing::warn!(
                    client = %key,
                    "admin authentication blocked: more than {FAILURES_PER_MINUTE} failures a minute from this address"
                );
            }
            None => budget.logged = false,
            _ => {}
        }
        wait
    }

    fn count(&mut self, key: IpAddr, now: Instant) {
        let budget = self.budget(key, now);
        budget.refill(now);
        budget.tokens = (budget.tokens - 1.0).max(0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer(token: &str) -> HeaderValue {
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap()
    }

    #[test]
    fn tokens_are_compared_whole() {
        let token = AdminToken::new(" s3cret\n").unwrap();
        assert!(token.accepts(Some(&bearer("s3cret"))));
        for wrong in ["s3cre", "s3cret!", "", "S3CRET"] {
            assert!(!token.accepts(Some(&bearer(wrong))), "{wrong}");
        }
        assert!(!token.accepts(None));
        assert!(AdminToken::new("  ").is_err());
    }

    #[test]
    fn regression_a_rebinding_host_name_does_not_reach_the_admin_endpoint() {
        let guard = AdminGuard::new(None, &["wharf-admin.prod.svc".into()]);
        for allowed in [
            None,
            Some("127.0.0.1:9090"),
            Some("[::1]:9090"),
            Some("10.1.2.3"),
            Some("localhost:9090"),
            Some("LOCALHOST"),
            Some("wharf-admin.prod.svc:9090"),
            Some("Wharf-Admin.prod.svc."),
        ] {
            assert!(guard.allows_host(allowed), "{allowed:?}");
        }
        for refused in [
            Some("attacker.example:9090"),
            Some("localhost.attacker.example"),
            Some("127.0.0.1.nip.io"),
            Some("not a host"),
        ] {
            assert!(!guard.allows_host(refused), "{refused:?}");
        }
    }

    #[test]
    fn regression_token_guessing_is_slowed_to_a_few_tries_a_minute() {
        let guard = AdminGuard::new(Some(AdminToken::new("right").unwrap()), &[]);
        let peer: IpAddr = "192.0.2.7".parse().unwrap();
        let wrong = bearer("wrong");
        for _ in 0..FAILURES_PER_MINUTE {
            assert_eq!(guard.check(Some(&wrong), peer), Credentials::Refused);
        }
        // Blocked now, even with the right token: no oracle while blocked.
        assert!(matches!(
            guard.check(Some(&bearer("right")), peer),
            Credentials::Blocked(wait) if wait > Duration::ZERO && wait <= Duration::from_secs(6)
        ));
        // Other addresses are not.
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        assert_eq!(
            guard.check(Some(&bearer("right")), other),
            Credentials::Valid
        );
        // An IPv6 /64 is one address.
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let b: IpAddr = "2001:db8::2".parse().unwrap();
        assert_eq!(address_key(a), address_key(b));
        let none = AdminGuard::new(None, &[]);
        assert_eq!(none.check(None, peer), Credentials::NoTokenConfigured);
    }
}
