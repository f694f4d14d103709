//! Names of the HTTP headers Wharf reads and writes, in one place: the
//! front door sets them, guests and their outgoing calls see them.

/// Header carrying the request id, kept if the client sent a sane one.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Header telling a service the route prefix that was removed from the path.
pub const FORWARDED_PREFIX_HEADER: &str = "x-forwarded-prefix";

/// Response header naming the generation of the service that answered.
pub const GENERATION_HEADER: &str = "x-wharf-generation";

/// Header carrying how many service-to-service hops led to a request.
pub const HOPS_HEADER: &str = "x-wharf-hops";

/// The prefix of every header only the host may set on a request a service
/// sees (`x-wharf-hops`, and a message delivery's `x-wharf-topic`,
/// `x-wharf-group`, …).
pub const HOST_HEADER_PREFIX: &str = "x-wharf-";

/// Removes every `x-wharf-*` header from `headers`: a client's request or a
/// guest's call to another service may not claim what only the host says
/// (a hop count, that a request is a message delivery).
pub fn strip_host_headers(headers: &mut http::HeaderMap) {
    let claimed: Vec<http::HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().starts_with(HOST_HEADER_PREFIX))
        .cloned()
        .collect();
    for name in claimed {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regression_clients_cannot_claim_host_headers() {
        let mut headers = http::HeaderMap::new();
        for name in [
            HOPS_HEADER,
            "x-wharf-group",
            "X-Wharf-Topic",
            "x-wharf-attempt",
        ] {
            headers.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                http::HeaderValue::from_static("forged"),
            );
        }
        headers.insert("x-wharfish", http::HeaderValue::from_static("kept"));
        strip_host_headers(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key("x-wharfish"));
    }
}
