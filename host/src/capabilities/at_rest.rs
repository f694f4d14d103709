//! Encryption at rest (`[encryption]` in `wharf.toml`, `--encryption-key`):
//! values are sealed with AES-256-GCM before a backend stores them, so the
//! embedded store's files, a Redis dump or a NATS stream's blocks hold no
//! value in the clear. Each sealed value names the key that sealed it, so
//! keys can be rotated: new writes use the current key, and values sealed
//! with a previous one still open until they are written again.
//!
//! A sealed value is `b"WS"`, a format byte, the sealing key's id (the
//! first four bytes of its SHA-256), a random 96-bit nonce, and the
//! ciphertext with its 16-byte tag. The associated data binds a value to
//! where it is stored (its bucket and key), so a value moved to another key
//! does not open.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, anyhow, bail};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

/// The first bytes of every sealed value.
const MAGIC: &[u8; 2] = b"WS";
/// The format written now.
const FORMAT: u8 = 1;
/// Bytes of a key id.
const KEY_ID_LEN: usize = 4;
/// Bytes of the tag AES-GCM appends.
const TAG_LEN: usize = 16;
/// What sealing adds to a value's size.
pub const SEAL_OVERHEAD: usize = MAGIC.len() + 1 + KEY_ID_LEN + NONCE_LEN + TAG_LEN;
/// Largest key file read: a key is 64 hex digits and a newline.
const MAX_KEY_FILE: u64 = 4096;

/// Where the keys are: the current one, and previous ones that still open
/// values sealed before a rotation. Files of 64 hex digits (32 random
/// bytes), regular files only.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AtRestKeys {
    /// The key new values are sealed with.
    pub key: PathBuf,
    /// Keys that only open.
    pub previous: Vec<PathBuf>,
}

/// One loaded key.
struct SealingKey {
    id: [u8; KEY_ID_LEN],
    key: LessSafeKey,
}

/// Seals and opens values with the keys of an [`AtRestKeys`].
pub struct Sealer {
    current: SealingKey,
    previous: Vec<SealingKey>,
    random: SystemRandom,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("key_id", &hex(&self.current.id))
            .field("previous", &self.previous.len())
            .finish()
    }
}

impl Sealer {
    /// Reads the key files. Blocking.
    pub fn load(keys: &AtRestKeys) -> Result<Sealer> {
        let current = load_key(&keys.key).context("encryption.key")?;
        let previous = keys
            .previous
            .iter()
            .map(|path| load_key(path).context("encryption.previous"))
            .collect::<Result<Vec<_>>>()?;
        Ok(Sealer {
            current,
            previous,
            random: SystemRandom::new(),
        })
    }

    /// The current key's id, as hex, for logs and status.
    pub fn key_id(&self) -> String {
        hex(&self.current.id)
    }

    /// `value` sealed with the current key, bound to `context` (where it
    /// is stored).
    pub fn seal(&self, context: &[u8], value: &[u8]) -> Result<Vec<u8>, String> {
        let mut nonce = [0u8; NONCE_LEN];
        self.random
            .fill(&mut nonce)
            .map_err(|_| "encryption: no random numbers from the system".to_string())?;
        let mut sealed = Vec::with_capacity(value.len() + SEAL_OVERHEAD);
        sealed.extend_from_slice(MAGIC);
        sealed.push(FORMAT);
        sealed.extend_from_slice(&self.current.id);
        sealed.extend_from_slice(&nonce);
        let header = sealed.len();
        sealed.extend_from_slice(value);
        // Encrypts the value in place behind the header, and appends the tag.
        let tag = self
            .current
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context),
                &mut sealed[header..],
            )
            .map_err(|_| "encryption: sealing failed".to_string())?;
        sealed.extend_from_slice(tag.as_ref());
        Ok(sealed)
    }

    /// Whether `sealed` was sealed with the current key (a value sealed
    /// with a previous one, or not sealed at all, is not).
    pub fn is_current(&self, sealed: &[u8]) -> bool {
        let id_at = MAGIC.len() + 1;
        sealed.starts_with(MAGIC)
            && sealed.get(MAGIC.len()) == Some(&FORMAT)
            && sealed.get(id_at..id_at + KEY_ID_LEN) == Some(&self.current.id[..])
    }

    /// The value `sealed` holds, if it was sealed for `context` by one of
    /// the keys; the error says why not, without the value.
    pub fn open(&self, context: &[u8], sealed: &[u8]) -> Result<Vec<u8>, String> {
        let header = MAGIC.len() + 1 + KEY_ID_LEN + NONCE_LEN;
        if sealed.len() < header + TAG_LEN || !sealed.starts_with(MAGIC) {
            return Err(
                "encryption: the stored value is not encrypted (written before encryption was turned on?)"
                    .into(),
            );
        }
        if sealed[MAGIC.len()] != FORMAT {
            return Err(format!(
                "encryption: the stored value has format {}, this version reads {FORMAT}",
                sealed[MAGIC.len()]
            ));
        }
        let id_at = MAGIC.len() + 1;
        let id = &sealed[id_at..id_at + KEY_ID_LEN];
        let key = std::iter::once(&self.current)
            .chain(&self.previous)
            .find(|key| key.id == id)
            .ok_or_else(|| {
                format!(
                    "encryption: the stored value was sealed with key {}, which this host does not have (current {})",
                    hex(id),
                    self.key_id()
                )
            })?;
        let nonce_at = id_at + KEY_ID_LEN;
        let nonce = Nonce::try_assume_unique_for_key(&sealed[nonce_at..header])
            .map_err(|_| "encryption: a malformed nonce".to_string())?;
        let mut body = sealed[header..].to_vec();
        let plain = key
            .key
            .open_in_place(nonce, Aad::from(context), &mut body)
            .map_err(|_| {
                "encryption: the stored value does not open: it was altered, or belongs under another key"
                    .to_string()
            })?;
        Ok(plain.to_vec())
    }
}

/// Reads and checks one key file.
fn load_key(path: &Path) -> Result<SealingKey> {
    let text = crate::base::files::read_bounded_text(path, MAX_KEY_FILE)
        .map_err(|why| anyhow!("{}: {why}", path.display()))?;
    let bytes = parse_hex(text.trim()).ok_or_else(|| {
        anyhow!(
            "{}: a key is 64 hexadecimal digits (32 random bytes), e.g. from `od -An -tx1 -N32 /dev/urandom | tr -d ' \\n'`",
            path.display()
        )
    })?;
    if bytes.len() != 32 {
        bail!(
            "{}: a key is 64 hexadecimal digits (32 bytes); this one has {}",
            path.display(),
            bytes.len() * 2
        );
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
    let mut id = [0u8; KEY_ID_LEN];
    id.copy_from_slice(&digest.as_ref()[..KEY_ID_LEN]);
    let key = UnboundKey::new(&AES_256_GCM, &bytes)
        .map_err(|_| anyhow!("{}: not a usable AES-256 key", path.display()))?;
    Ok(SealingKey {
        id,
        key: LessSafeKey::new(key),
    })
}

fn parse_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(text.get(at..at + 2)?, 16).ok())
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_file(dir: &Path, name: &str, hex: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, format!("{hex}\n")).unwrap();
        path
    }

    const KEY_A: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
    const KEY_B: &str = "f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff000102030405060708090a0b0c0d0e0f";

    #[test]
    fn values_open_only_where_they_were_sealed_and_with_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let a = key_file(dir.path(), "a.key", KEY_A);
        let b = key_file(dir.path(), "b.key", KEY_B);
        let sealer = Sealer::load(&AtRestKeys {
            key: a.clone(),
            previous: Vec::new(),
        })
        .unwrap();
        let sealed = sealer.seal(b"bucket\0key", b"secret").unwrap();
        assert_eq!(sealed.len(), 6 + SEAL_OVERHEAD);
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(sealer.open(b"bucket\0key", &sealed).unwrap(), b"secret");
        // Two seals of one value differ (a fresh nonce each time).
        assert_ne!(sealer.seal(b"bucket\0key", b"secret").unwrap(), sealed);
        // Moved to another key, or altered: refused.
        assert!(sealer.open(b"bucket\0other", &sealed).is_err());
        let mut altered = sealed.clone();
        *altered.last_mut().unwrap() ^= 1;
        assert!(sealer.open(b"bucket\0key", &altered).is_err());
        // Plain text is named as such.
        let plain = sealer.open(b"bucket\0key", b"plain text").unwrap_err();
        assert!(plain.contains("not encrypted"), "{plain}");
        // After a rotation the old key still opens; a host without it says
        // which key it lacks.
        let rotated = Sealer::load(&AtRestKeys {
            key: b.clone(),
            previous: vec![a],
        })
        .unwrap();
        assert_eq!(rotated.open(b"bucket\0key", &sealed).unwrap(), b"secret");
        let only_b = Sealer::load(&AtRestKeys {
            key: b,
            previous: Vec::new(),
        })
        .unwrap();
        let missing = only_b.open(b"bucket\0key", &sealed).unwrap_err();
        assert!(missing.contains(&sealer.key_id()), "{missing}");
    }

    #[test]
    fn bad_key_files_are_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let short = key_file(dir.path(), "short.key", "abcd");
        let err = format!(
            "{:#}",
            Sealer::load(&AtRestKeys {
                key: short,
                previous: Vec::new()
            })
            .unwrap_err()
        );
        assert!(err.contains("64 hexadecimal digits"), "{err}");
        let device = Sealer::load(&AtRestKeys {
            key: "/dev/zero".into(),
            previous: Vec::new(),
        })
        .unwrap_err();
        assert!(format!("{device:#}").contains("/dev/zero"), "{device:#}");
    }
}
