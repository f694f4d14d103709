//! Unguessable values, from the operating system's CSPRNG: for what another
//! service must not be able to predict (reply inboxes). `fastrand` stays
//! the choice where predictability costs nothing (jitter, sampling).

/// `BYTES` random bytes from the operating system, as lower-case hex; an
/// error if the operating system cannot supply randomness.
pub fn unguessable_hex<const BYTES: usize>() -> Result<String, String> {
    let mut bytes = [0u8; BYTES];
    getrandom::fill(&mut bytes)
        .map_err(|err| format!("the operating system's random number generator failed: {err}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_hex_of_the_size_asked_and_differ() {
        let a = unguessable_hex::<16>().unwrap();
        let b = unguessable_hex::<16>().unwrap();
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
