//! Backend addresses as Wharf shows them: the one function every log line,
//! error, status detail, `/services` entry and dashboard field goes through
//! when it prints an address a user configured, so a password or token in
//! it is never echoed, whatever the backend.

/// Query parameters whose values are credentials.
const SECRET_PARAMETERS: &[&str] = &["password", "pass", "token", "secret", "auth", "key"];

/// `text` — one URL or a comma-separated list of them (`nats://a,nats://b`)
/// — with every credential replaced by `***`: the password of
/// `user:password@`, a lone token or user in `token@`, and the value of any
/// credential query parameter (`?password=…`). Text that is not a URL is
/// returned as it is.
pub fn url(text: &str) -> String {
    text.split(',')
        .map(|one| single(one.trim()))
        .collect::<Vec<_>>()
        .join(",")
}

fn single(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let (scheme, rest) = url.split_at(scheme_end + 3);
    // The authority ends at the first '/', '?' or '#'; user-info ends at its
    // last '@'.
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rfind('@') {
        Some(at) => {
            let (userinfo, host) = authority.split_at(at);
            match userinfo.split_once(':') {
                Some((user, _password)) => format!("{user}:***{host}"),
                None => format!("***{host}"),
            }
        }
        None => authority.to_string(),
    };
    format!("{scheme}{authority}{}", query(tail))
}

/// `tail` (path, query, fragment) with credential query values hidden.
fn query(tail: &str) -> String {
    let Some(start) = tail.find('?') else {
        return tail.to_string();
    };
    let (path, rest) = tail.split_at(start + 1);
    let (query, fragment) = match rest.find('#') {
        Some(hash) => rest.split_at(hash),
        None => (rest, ""),
    };
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _))
                if SECRET_PARAMETERS
                    .iter()
                    .any(|secret| key.eq_ignore_ascii_case(secret)) =>
            {
                format!("{key}=***")
            }
            _ => pair.to_string(),
        })
        .collect();
    format!("{path}{}{fragment}", pairs.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regression_every_backend_kind_hides_its_credentials() {
        for (given, shown) in [
            (
                "nats://user:hunter2@nats.example:7001",
                "nats://user:***@nats.example:7001",
            ),
            (
                "tls://user:hunter2@nats.example:4222",
                "tls://user:***@nats.example:4222",
            ),
            (
                "nats://a:hunter2@h1:4222,nats://b:hunter2@h2:4222",
                "nats://a:***@h1:4222,nats://b:***@h2:4222",
            ),
            (
                "nats://hunter2@nats.example:7001",
                "nats://***@nats.example:7001",
            ),
            (
                "redis://:hunter2@cache.example/0",
                "redis://:***@cache.example/0",
            ),
            (
                "rediss://default:hunter2@cache:6380",
                "rediss://default:***@cache:6380",
            ),
            (
                "redis://cache?password=hunter2&db=1",
                "redis://cache?password=***&db=1",
            ),
            (
                "amqp://guest:hunter2@broker/%2f",
                "amqp://guest:***@broker/%2f",
            ),
            (
                "amqps://guest:hunter2@broker:5671",
                "amqps://guest:***@broker:5671",
            ),
            (
                "kafka://user:hunter2@k1:9092,k2:9092",
                "kafka://user:***@k1:9092,k2:9092",
            ),
            ("redis://cache.example", "redis://cache.example"),
            ("embedded", "embedded"),
            ("amqp://guest:p@ss@host/", "amqp://guest:***@host/"),
        ] {
            let redacted = url(given);
            assert_eq!(redacted, shown, "{given}");
            assert!(!redacted.contains("hunter2"));
        }
    }
}
