//! Reading the files that settings and manifests name — secrets, tokens,
//! credentials, certificates, manifests, `wharf.toml`, components — the one
//! way: regular files only, opened without blocking (a FIFO never stalls the
//! reader), read with a hard byte bound (a device or `/proc` file reports
//! length 0 and never ends), and reporting the path the file really is
//! (after every symlink), for callers that check where a file lives.
//!
//! Blocking: call it from `spawn_blocking` or a thread of its own, never
//! from an async task.

use std::fs::File;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A regular file, open for reading: checked on the opened file, so
/// swapping the path between a check and the open changes nothing.
#[derive(Debug)]
pub struct RegularFile {
    file: File,
    /// The path as given, for messages.
    shown: PathBuf,
    /// The path it really is: symlinks resolved, from the open file itself.
    real_path: PathBuf,
}

impl RegularFile {
    /// Opens `path` without blocking on FIFOs or devices, and refuses
    /// anything but a regular file.
    pub fn open(path: &Path) -> Result<RegularFile, String> {
        let mut options = std::fs::OpenOptions::new();
        options.read(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            options.custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC);
        }
        let file = options
            .open(path)
            .map_err(|err| format!("cannot read {}: {err}", path.display()))?;
        let meta = file
            .metadata()
            .map_err(|err| format!("cannot inspect {}: {err}", path.display()))?;
        if !meta.is_file() {
            return Err(format!(
                "{} is not a regular file (a directory, device, FIFO or socket cannot be read here)",
                path.display()
            ));
        }
        let real_path = real_path_of(&file, path);
        Ok(RegularFile {
            file,
            shown: path.to_path_buf(),
            real_path,
        })
    }

    /// The path the file really is, after every symlink.
    pub fn real_path(&self) -> &Path {
        &self.real_path
    }

    /// The length its metadata reports now (0 for `/proc` files, which are
    /// regular but generated: never trust it as a bound).
    pub fn reported_len(&self) -> u64 {
        self.file.metadata().map_or(0, |meta| meta.len())
    }

    /// Reads the rest of the file, at most `max` bytes: a longer file is an
    /// error naming the bound, whatever its metadata claims.
    pub fn read_to_end(self, max: u64) -> Result<Vec<u8>, String> {
        let mut bytes = Vec::new();
        let shown = self.shown;
        self.file
            .take(max.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(|err| format!("cannot read {}: {err}", shown.display()))?;
        if bytes.len() as u64 > max {
            return Err(format!(
                "{} is larger than {max} bytes, the most read here",
                shown.display()
            ));
        }
        Ok(bytes)
    }

    /// The open file, for callers that read it their own way.
    pub fn into_file(self) -> File {
        self.file
    }
}

/// Reads the regular file at `path`, at most `max` bytes.
pub fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, String> {
    RegularFile::open(path)?.read_to_end(max)
}

/// Like [`read_bounded`], as UTF-8 text.
pub fn read_bounded_text(path: &Path, max: u64) -> Result<String, String> {
    let bytes = read_bounded(path, max)?;
    String::from_utf8(bytes).map_err(|_| format!("{} is not UTF-8 text", path.display()))
}

/// The path the open `file` really is. On Linux the kernel says (through
/// `/proc/self/fd`); elsewhere the path is resolved again.
fn real_path_of(file: &File, path: &Path) -> PathBuf {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd as _;
        if let Ok(real) = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())) {
            return real;
        }
    }
    let _ = file;
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Reads a whole file into shared memory in one allocation (collecting into
/// a `Vec` and converting would hold two copies at once: a 100 MiB upload
/// cost 200 MiB). Fails if the file changes length while it is read.
pub fn read_shared(path: &Path, max: u64) -> std::io::Result<Arc<[u8]>> {
    // Opened without blocking and checked regular on the open file: a FIFO
    // swapped in after the first look never stalls the reader.
    let file = RegularFile::open(path).map_err(std::io::Error::other)?;
    let len = file.reported_len();
    if len > max {
        return Err(std::io::Error::other(format!(
            "the file is {len} bytes, over the {max} byte limit"
        )));
    }
    let mut file = file.into_file();
    let len =
        usize::try_from(len).map_err(|_| std::io::Error::other("the file is too large to read"))?;
    let mut buffer = Arc::<[u8]>::new_uninit_slice(len);
    // A fresh Arc has no other owner.
    let Some(slots) = Arc::get_mut(&mut buffer) else {
        return Err(std::io::Error::other("a fresh buffer was shared"));
    };
    for slot in slots.iter_mut() {
        slot.write(0);
    }
    // SAFETY: every element was just initialised.
    let mut buffer = unsafe { buffer.assume_init() };
    let Some(bytes) = Arc::get_mut(&mut buffer) else {
        return Err(std::io::Error::other("a fresh buffer was shared"));
    };
    file.read_exact(bytes)?;
    if file.read(&mut [0u8; 1])? != 0 {
        return Err(std::io::Error::other("the file grew while it was read"));
    }
    Ok(buffer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_files_are_read_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, "12345").unwrap();
        assert_eq!(read_bounded(&path, 5).unwrap(), b"12345");
        let opened = RegularFile::open(&path).unwrap();
        assert_eq!(opened.real_path(), std::fs::canonicalize(&path).unwrap());
        let err = read_bounded(&path, 4).unwrap_err();
        assert!(err.contains("larger than 4 bytes"), "{err}");
        let err = read_bounded(dir.path(), 10).unwrap_err();
        assert!(err.contains("not a regular file"), "{err}");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn devices_and_fifos_are_refused_without_blocking() {
        let err = read_bounded(Path::new("/dev/zero"), 1 << 20).unwrap_err();
        assert!(err.contains("not a regular file"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let name = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
        let err = read_bounded(&fifo, 1 << 20).unwrap_err();
        assert!(err.contains("not a regular file"), "{err}");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn proc_files_are_bounded_by_what_is_read_not_their_length() {
        // /proc files claim length 0; the bound holds on what comes out.
        let err = read_bounded(Path::new("/proc/self/maps"), 16).unwrap_err();
        assert!(err.contains("larger than 16 bytes"), "{err}");
    }
}
