//! The pid file: written atomically by the generation that becomes active
//! (and by `baton run` for itself): the one writer of the workspace.

use std::io::{self, Write};
use std::path::Path;

/// Writes `pid` to `path` atomically: a temporary file in the same directory,
/// flushed, then renamed over the old one. A reader sees the old pid or the
/// new one, never a partial file.
pub fn write(path: &Path, pid: u32) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "pid file path has no file name",
        )
    })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{pid}.tmp"));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "{pid}")?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Removes the pid file if it still names `pid` (a newer generation may have
/// replaced it; that one is not ours to remove).
pub(crate) fn remove_if_ours(path: &Path, pid: u32) {
    if let Ok(s) = std::fs::read_to_string(path) {
        if s.trim() == pid.to_string() {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn writes_and_removes_only_our_own() {
        let dir = std::env::temp_dir().join(format!("baton-pidfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("x.pid");
        super::write(&p, 42).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "42\n");
        super::remove_if_ours(&p, 43);
        assert!(p.exists());
        super::remove_if_ours(&p, 42);
        assert!(!p.exists());
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "no temp file left"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
