//! Line framing with a bound: cuts a byte stream into `\n`-terminated lines, never holding more
//! than `max_line_bytes` (+1 for a `\r`) of an unfinished line.
//!
//! A line that outgrows the bound is dropped as it streams in and reported once, at its newline,
//! as [`Frame::TooLong`]; the line after it is framed normally, so garbage without newlines (a
//! binary burst, the wrong baud rate) costs only itself. This module must not do I/O or look
//! inside lines: parsing is `line.rs`'s job.

/// One framed unit.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A complete line without its `\n` and without a `\r` before it.
    Line(&'a [u8]),
    /// A line longer than the bound, dropped; `bytes` is how long it was.
    TooLong { bytes: usize },
}

#[derive(Debug)]
pub struct LineFramer {
    buf: Vec<u8>,
    max: usize,
    /// Dropping the rest of an overlong line until the next `\n`.
    discarding: bool,
    discarded: usize,
    /// `buf` holds the line returned last time; clear it before framing more.
    stale: bool,
}

impl LineFramer {
    pub fn new(max_line_bytes: usize) -> LineFramer {
        LineFramer {
            buf: Vec::with_capacity(max_line_bytes.min(4096) + 1),
            max: max_line_bytes,
            discarding: false,
            discarded: 0,
            stale: false,
        }
    }

    /// Bytes of an unfinished line held right now (never more than `max_line_bytes + 1`).
    pub fn buffered(&self) -> usize {
        if self.stale {
            0
        } else {
            self.buf.len()
        }
    }

    /// Takes bytes from `chunk` until one frame is complete and returns it, leaving the rest in
    /// `chunk`; `None` once `chunk` is used up (a partial line stays buffered).
    pub fn next_frame<'s, 'c: 's>(&'s mut self, chunk: &mut &'c [u8]) -> Option<Frame<'s>> {
        if self.stale {
            self.buf.clear();
            self.stale = false;
        }
        let data: &'c [u8] = chunk;
        if data.is_empty() {
            return None;
        }
        let Some(nl) = data.iter().position(|&b| b == b'\n') else {
            *chunk = &[];
            if self.discarding {
                self.discarded = self.discarded.saturating_add(data.len());
            } else if self.buf.len() + data.len() > self.max + 1 {
                self.discarding = true;
                self.discarded = self.buf.len() + data.len();
                self.buf.clear();
            } else {
                self.buf.extend_from_slice(data);
            }
            return None;
        };
        let part = &data[..nl];
        *chunk = &data[nl + 1..];
        if self.discarding {
            let bytes = self.discarded.saturating_add(part.len());
            self.discarding = false;
            self.discarded = 0;
            return Some(Frame::TooLong { bytes });
        }
        let line: &'s [u8] = if self.buf.is_empty() {
            part
        } else {
            let total = self.buf.len() + part.len();
            if total > self.max + 1 {
                self.buf.clear();
                return Some(Frame::TooLong { bytes: total });
            }
            self.buf.extend_from_slice(part);
            self.stale = true;
            &self.buf
        };
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.len() > self.max {
            return Some(Frame::TooLong { bytes: line.len() });
        }
        Some(Frame::Line(line))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(f: &mut LineFramer, mut chunk: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(fr) = f.next_frame(&mut chunk) {
            out.push(match fr {
                Frame::Line(l) => String::from_utf8_lossy(l).into_owned(),
                Frame::TooLong { bytes } => format!("<too long {bytes}>"),
            });
        }
        out
    }

    #[test]
    fn splits_and_bounds() {
        let mut f = LineFramer::new(8);
        assert_eq!(frames(&mut f, b"ab\r\ncd\nxy"), ["ab", "cd"]);
        assert_eq!(f.buffered(), 2);
        assert_eq!(
            frames(&mut f, b"z\n12345678\r\n123456789\nok\n"),
            ["xyz", "12345678", "<too long 9>", "ok"]
        );
        // An overlong line in pieces is never held whole.
        assert_eq!(frames(&mut f, b"0123456"), Vec::<String>::new());
        assert_eq!(frames(&mut f, b"0123456"), Vec::<String>::new());
        assert_eq!(f.buffered(), 0);
        assert_eq!(frames(&mut f, &[0u8; 10_000]), Vec::<String>::new());
        assert!(f.buffered() <= 9);
        assert_eq!(
            frames(&mut f, b"tail\ngood\n"),
            [format!("<too long {}>", 14 + 10_000 + 4).as_str(), "good"]
        );
        // Exactly max bytes split over chunks, with \r.
        assert_eq!(frames(&mut f, b"1234"), Vec::<String>::new());
        assert_eq!(frames(&mut f, b"5678\r"), Vec::<String>::new());
        assert_eq!(frames(&mut f, b"\n"), ["12345678"]);
        assert_eq!(frames(&mut f, b"\n\n"), ["", ""]);
    }
}
