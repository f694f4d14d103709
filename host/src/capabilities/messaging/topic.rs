//! Topics and topic patterns.
//!
//! A topic is dot-separated tokens of letters, digits, `-` and `_`
//! (`orders.created`). A pattern may use `*` for exactly one token and, as
//! its last token, `>` for one or more (`orders.*`, `orders.>`) — NATS's
//! syntax, which Wharf maps to each broker's own. Topics whose first token
//! starts with `_` are the host's own (reply inboxes, dead letters): guests
//! cannot publish to them or be triggered by them.

/// Longest topic, in bytes.
pub const MAX_TOPIC: usize = 255;

fn valid_token(token: &str) -> bool {
    !token.is_empty()
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Checks a topic a guest publishes to.
pub fn validate_topic(topic: &str) -> Result<(), String> {
    if topic.is_empty() || topic.len() > MAX_TOPIC {
        return Err(format!("{topic:?} is not a topic: use 1-{MAX_TOPIC} bytes"));
    }
    if !topic.split('.').all(valid_token) {
        return Err(format!(
            "{topic:?} is not a topic: use dot-separated tokens of letters, digits, '-' and '_'"
        ));
    }
    if topic.starts_with('_') {
        return Err(format!(
            "{topic:?} is reserved for the host (topics starting with '_')"
        ));
    }
    Ok(())
}

/// A topic pattern: tokens, `*` for one token, a trailing `>` for one or
/// more.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPattern(String);

impl TopicPattern {
    /// Parses a pattern, explaining what is wrong with a bad one.
    pub fn parse(text: &str) -> Result<TopicPattern, String> {
        if text.is_empty() || text.len() > MAX_TOPIC {
            return Err(format!(
                "{text:?} is not a topic pattern: use 1-{MAX_TOPIC} bytes"
            ));
        }
        let tokens: Vec<&str> = text.split('.').collect();
        for (index, token) in tokens.iter().enumerate() {
            let last = index + 1 == tokens.len();
            let ok = valid_token(token) || *token == "*" || (*token == ">" && last);
            if !ok {
                return Err(format!(
                    "{text:?} is not a topic pattern: tokens are letters, digits, '-' and '_', '*' for one token, and a last '>' for the rest"
                ));
            }
        }
        if text.starts_with('_') {
            return Err(format!(
                "{text:?} is reserved for the host (topics starting with '_')"
            ));
        }
        Ok(TopicPattern(text.to_string()))
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `topic` matches.
    pub fn matches(&self, topic: &str) -> bool {
        let mut topic_tokens = topic.split('.');
        for token in self.0.split('.') {
            match token {
                ">" => return topic_tokens.next().is_some(),
                "*" => {
                    if topic_tokens.next().is_none() {
                        return false;
                    }
                }
                exact => {
                    if topic_tokens.next() != Some(exact) {
                        return false;
                    }
                }
            }
        }
        topic_tokens.next().is_none()
    }

    /// Whether every topic `other` matches is matched by this pattern too.
    pub fn covers(&self, other: &TopicPattern) -> bool {
        let mine: Vec<&str> = self.0.split('.').collect();
        let theirs: Vec<&str> = other.0.split('.').collect();
        for (index, token) in mine.iter().enumerate() {
            if *token == ">" {
                // One or more tokens: anything with at least one more.
                return theirs.len() > index;
            }
            let Some(their) = theirs.get(index) else {
                return false;
            };
            let ok = match *token {
                "*" => *their != ">",
                exact => *their == exact,
            };
            if !ok {
                return false;
            }
        }
        theirs.len() == mine.len()
    }

    /// The pattern in AMQP topic-exchange syntax (`>` is `#`).
    pub fn to_amqp(&self) -> String {
        self.0
            .split('.')
            .map(|token| if token == ">" { "#" } else { token })
            .collect::<Vec<_>>()
            .join(".")
    }
}

impl std::fmt::Display for TopicPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics() {
        assert!(validate_topic("orders.created").is_ok());
        assert!(validate_topic("a").is_ok());
        for bad in [
            "",
            "orders..created",
            ".x",
            "x.",
            "a b",
            "or*ders",
            "_inbox.x",
            "a.>",
        ] {
            assert!(validate_topic(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn patterns_match_like_nats() {
        let p = |t| TopicPattern::parse(t).unwrap();
        assert!(p("orders.created").matches("orders.created"));
        assert!(!p("orders.created").matches("orders.created.eu"));
        assert!(p("orders.*").matches("orders.created"));
        assert!(!p("orders.*").matches("orders"));
        assert!(!p("orders.*").matches("orders.created.eu"));
        assert!(p("orders.>").matches("orders.created.eu"));
        assert!(!p("orders.>").matches("orders"));
        assert!(p("*.created").matches("orders.created"));
        assert!(p(">").matches("anything.at.all"));
        assert_eq!(p("orders.>").to_amqp(), "orders.#");
        assert!(p("orders.*").covers(&p("orders.created")));
        assert!(p("orders.*").covers(&p("orders.*")));
        assert!(!p("orders.*").covers(&p("orders.>")));
        assert!(!p("orders.*").covers(&p("orders")));
        assert!(p("orders.>").covers(&p("orders.a.*")));
        assert!(p(">").covers(&p("anything.>")));
        assert!(!p("orders.created").covers(&p("orders.*")));
        for bad in ["", "a.>.b", "a..b", "_dead.x", "a b", "**"] {
            assert!(TopicPattern::parse(bad).is_err(), "{bad}");
        }
    }
}
