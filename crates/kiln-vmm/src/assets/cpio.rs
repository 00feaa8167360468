//! A writer for the "newc" cpio format the kernel unpacks as an initramfs.
//!
//! Each entry is a 110-byte ASCII header (`070701` and thirteen 8-digit hex fields), the
//! NUL-terminated name padded to 4 bytes, then the data padded to 4 bytes. A `TRAILER!!!`
//! entry ends the archive. Times are zero so the same inputs give the same bytes.

use std::io::{self, Write};

const MAGIC: &[u8; 6] = b"070701";
const TRAILER: &str = "TRAILER!!!";

/// File type bits of `st_mode`.
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFCHR: u32 = 0o020000;

/// Streams newc entries into `W`.
pub(crate) struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
    written: u64,
}

impl<W: Write> CpioWriter<W> {
    /// A writer that appends entries to `out`.
    pub(crate) fn new(out: W) -> CpioWriter<W> {
        CpioWriter {
            out,
            next_ino: 1,
            written: 0,
        }
    }

    /// Adds a directory (`name` without a leading `/`).
    pub(crate) fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        self.entry(name, S_IFDIR | perm, 2, (0, 0), &[])
    }

    /// Adds a regular file with `data`.
    pub(crate) fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, S_IFREG | perm, 1, (0, 0), data)
    }

    /// Adds a character device node.
    pub(crate) fn char_dev(
        &mut self,
        name: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> io::Result<()> {
        self.entry(name, S_IFCHR | perm, 1, (major, minor), &[])
    }

    /// Writes the trailer and returns the sink.
    pub(crate) fn finish(mut self) -> io::Result<W> {
        self.entry_with_ino(TRAILER, 0, 0, 1, (0, 0), &[])?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        let ino = self.next_ino;
        self.next_ino += 1;
        self.entry_with_ino(name, ino, mode, nlink, rdev, data)
    }

    fn entry_with_ino(
        &mut self,
        name: &str,
        ino: u32,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> io::Result<()> {
        let size = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{name} exceeds 4 GiB"))
        })?;
        let name_size = u32::try_from(name.len() + 1)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "name too long"))?;
        let fields = [
            ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, name_size, 0,
        ];
        let mut header = Vec::with_capacity(110 + name.len() + 4);
        header.extend_from_slice(MAGIC);
        for field in fields {
            header.extend_from_slice(format!("{field:08x}").as_bytes());
        }
        header.extend_from_slice(name.as_bytes());
        header.push(0);
        self.write_padded(&header)?;
        self.write_padded(data)
    }

    fn write_padded(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        let pad = (4 - (self.written % 4) as usize) % 4;
        self.out.write_all(&[0u8; 3][..pad])?;
        self.written += pad as u64;
        Ok(())
    }
}

/// One entry read back from an archive.
#[cfg(test)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CpioEntry {
    pub name: String,
    pub mode: u32,
    pub rdev: (u32, u32),
    pub data: Vec<u8>,
}

/// Parses a newc archive up to its trailer (the tests read archives back with it).
#[cfg(test)]
pub(crate) fn parse(mut bytes: &[u8]) -> io::Result<Vec<CpioEntry>> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let mut offset = 0usize;
    let mut entries = Vec::new();
    loop {
        if bytes.len() < 110 || &bytes[..6] != MAGIC {
            return Err(bad("missing newc header"));
        }
        let field = |i: usize| -> io::Result<u32> {
            let text =
                std::str::from_utf8(&bytes[6 + i * 8..14 + i * 8]).map_err(|_| bad("header"))?;
            u32::from_str_radix(text, 16).map_err(|_| bad("header field"))
        };
        let (mode, size, rmaj, rmin, name_size) =
            (field(1)?, field(6)?, field(9)?, field(10)?, field(11)?);
        let name_end = 110 + name_size as usize;
        if bytes.len() < name_end || name_size == 0 {
            return Err(bad("truncated name"));
        }
        let name = String::from_utf8_lossy(&bytes[110..name_end - 1]).into_owned();
        let data_start = align4(offset + name_end) - offset;
        let data_end = data_start + size as usize;
        if bytes.len() < data_end {
            return Err(bad("truncated data"));
        }
        if name == TRAILER {
            return Ok(entries);
        }
        entries.push(CpioEntry {
            name,
            mode,
            rdev: (rmaj, rmin),
            data: bytes[data_start..data_end].to_vec(),
        });
        let next = align4(offset + data_end) - offset;
        if bytes.len() < next {
            return Err(bad("truncated padding"));
        }
        bytes = &bytes[next..];
        offset += next;
    }
}

#[cfg(test)]
fn align4(n: usize) -> usize {
    (n + 3) & !3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_when_parsed_back_then_entries_match() {
        let mut cpio = CpioWriter::new(Vec::new());
        cpio.dir("dev", 0o755).expect("dir");
        cpio.char_dev("dev/console", 0o600, 5, 1).expect("dev");
        cpio.file("init", 0o755, b"odd-length!").expect("file");
        cpio.file("e", 0o644, b"").expect("empty file");

        let bytes = cpio.finish().expect("finish");

        let entries = parse(&bytes).expect("parse");
        let entry = |name: &str, mode: u32, rdev: (u32, u32), data: &[u8]| CpioEntry {
            name: name.into(),
            mode,
            rdev,
            data: data.to_vec(),
        };
        assert_eq!(
            entries,
            [
                entry("dev", 0o040755, (0, 0), b""),
                entry("dev/console", 0o020600, (5, 1), b""),
                entry("init", 0o100755, (0, 0), b"odd-length!"),
                entry("e", 0o100644, (0, 0), b""),
            ]
        );
        assert_eq!(bytes.len() % 4, 0);
    }

    #[test]
    fn header_when_written_then_matches_newc_layout() {
        let mut cpio = CpioWriter::new(Vec::new());
        cpio.file("a", 0o644, b"xyz").expect("file");

        let bytes = cpio.finish().expect("finish");

        let expected_header = concat!(
            "070701", "00000001", "000081a4", "00000000", "00000000", "00000001", "00000000",
            "00000003", "00000000", "00000000", "00000000", "00000000", "00000002", "00000000",
            "a\0"
        );
        assert_eq!(&bytes[..112], expected_header.as_bytes());
        assert_eq!(&bytes[112..116], b"xyz\0");
    }
}
