//! Content-defined chunking of a byte stream (FastCDC 2020, seeded).
//!
//! Cut points are exactly those of `fastcdc::v2020::StreamCDC` with the same
//! parameters and seed, but the read buffer belongs to the caller and is
//! reused across files: the crate's stream chunker allocates and zero-fills
//! a max-size buffer per file and per chunk, which dominated the CPU profile
//! of backups with many small files.
//!
//! Holes of a sparse file are not read. Inside a run of zeros a chunk that
//! starts there always ends after the same length (the gear hash starts
//! afresh at each chunk), so a hole long enough yields that "zero chunk"
//! again and again without a byte read: [`Piece::Zeros`]. Reading the hole
//! would give exactly the same cut points, so a file's chunks (and dedup
//! against its earlier, non-sparse copies) do not depend on how it is
//! stored.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;

use fastcdc::v2020::{FastCDC, Normalization};
use nix::errno::Errno;
use nix::unistd::{lseek, Whence};

use crate::format::ChunkerParams;

/// What the chunker yields.
pub enum Piece {
    Data(Vec<u8>),
    /// A zero chunk of [`ZeroChunk::len`] bytes inside a hole.
    Zeros(usize),
}

impl Piece {
    pub fn len(&self) -> usize {
        match self {
            Piece::Data(d) => d.len(),
            Piece::Zeros(n) => *n,
        }
    }
}

/// A source whose holes can be found (files); other readers have none.
pub trait Holes: Read {
    /// The end of the hole `off` lies in, or `None` when `off` is in data;
    /// with it, how far from `off` data is known to go on without a hole
    /// (`u64::MAX` when unknown).
    fn hole_at(&mut self, off: u64) -> std::io::Result<HoleAt> {
        let _ = off;
        Ok(HoleAt::Data { until: u64::MAX })
    }

    /// Continues reading at `off` (after holes were skipped).
    fn seek_to(&mut self, off: u64) -> std::io::Result<()>;
}

pub enum HoleAt {
    Hole { end: u64 },
    Data { until: u64 },
}

impl Holes for &[u8] {
    fn seek_to(&mut self, _off: u64) -> std::io::Result<()> {
        Err(std::io::Error::other("a byte slice has no holes to skip"))
    }
}

/// A regular file, asked for holes only when it has fewer blocks than
/// bytes (others cost no extra system call).
///
/// Reads are positional (`pread`) from the file's own offset, because
/// `SEEK_DATA`/`SEEK_HOLE` move the descriptor's offset as they answer.
pub struct SparseFile {
    file: File,
    sparse: bool,
    offset: u64,
}

impl SparseFile {
    pub fn new(file: File, sparse: bool) -> Self {
        Self {
            file,
            sparse,
            offset: 0,
        }
    }
}

impl Read for SparseFile {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read_at(buf, self.offset)?;
        self.offset += n as u64;
        Ok(n)
    }
}

impl Holes for SparseFile {
    fn hole_at(&mut self, off: u64) -> std::io::Result<HoleAt> {
        if !self.sparse {
            return Ok(HoleAt::Data { until: u64::MAX });
        }
        let at = i64::try_from(off).map_err(std::io::Error::other)?;
        let fd = self.file.as_fd();
        match lseek(fd, at, Whence::SeekData) {
            Ok(d) if d > at => Ok(HoleAt::Hole { end: d as u64 }),
            Ok(_) => {
                let h = lseek(fd, at, Whence::SeekHole).map_err(std::io::Error::from)?;
                Ok(HoleAt::Data { until: h as u64 })
            }
            // No data after `off`: a hole to the end of the file.
            Err(Errno::ENXIO) => Ok(HoleAt::Hole {
                end: self.file.metadata()?.len(),
            }),
            // Filesystems without SEEK_DATA: everything is data.
            Err(Errno::EINVAL) => {
                self.sparse = false;
                Ok(HoleAt::Data { until: u64::MAX })
            }
            Err(e) => Err(e.into()),
        }
    }

    fn seek_to(&mut self, off: u64) -> std::io::Result<()> {
        self.offset = off;
        Ok(())
    }
}

/// The chunk every run of zeros is cut into, for one set of parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZeroChunk {
    pub len: usize,
}

impl ZeroChunk {
    pub fn new(params: &ChunkerParams, seed: u64) -> Self {
        let max = params.max_size as usize;
        let zeros = vec![0u8; 2 * max];
        let len = FastCDC::with_level_and_seed(
            &zeros,
            params.min_size as usize,
            params.avg_size as usize,
            max,
            Normalization::Level1,
            seed,
        )
        .next()
        .map_or(max, |c| c.length);
        Self { len }
    }
}

pub struct Chunker<'b, R> {
    src: R,
    buf: &'b mut Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
    min: usize,
    avg: usize,
    max: usize,
    seed: u64,
    /// File offset of `buf[start]`.
    pos: u64,
    /// Holes are looked for from here on (before it: known data or a
    /// hole too short to skip).
    check_from: u64,
    /// End of the hole being skipped.
    hole_end: u64,
    /// Size of the file when its holes are looked for.
    len: u64,
    zero: Option<ZeroChunk>,
    /// Zero chunks were yielded: reading resumes at `pos`.
    seek_pending: bool,
}

impl<'b, R: Holes> Chunker<'b, R> {
    /// `buf` is scratch space kept by the caller between files.
    pub fn new(src: R, buf: &'b mut Vec<u8>, params: &ChunkerParams, seed: u64) -> Self {
        let max = params.max_size as usize;
        if buf.len() < 2 * max {
            // Zeroed by the allocator (fresh pages), not by writing zeros:
            // a worker that only ever reads small files touches a few KiB
            // of its 8 MiB, not all of it.
            *buf = vec![0; 2 * max];
        }
        Self {
            src,
            buf,
            start: 0,
            end: 0,
            eof: false,
            min: params.min_size as usize,
            avg: params.avg_size as usize,
            max,
            seed,
            pos: 0,
            check_from: u64::MAX,
            hole_end: 0,
            len: 0,
            zero: None,
            seek_pending: false,
        }
    }

    /// Skips holes of a file `len` bytes long, yielding `zero` for them.
    pub fn skipping_holes(mut self, zero: ZeroChunk, len: u64) -> Self {
        self.zero = Some(zero);
        self.len = len;
        self.check_from = 0;
        self
    }

    /// Whether the chunk starting at `pos` is a zero chunk of a hole. Only
    /// where the file goes on for a whole maximum chunk after it: nearer
    /// the end, a read would see less than `max` bytes and could cut
    /// elsewhere.
    fn zero_here(&mut self) -> std::io::Result<Option<usize>> {
        let Some(zero) = self.zero else {
            return Ok(None);
        };
        let z = zero.len as u64;
        let room = |end: u64, pos: u64, len: u64| {
            end.saturating_sub(pos) >= z && len.saturating_sub(pos) >= self.max as u64
        };
        if room(self.hole_end, self.pos, self.len) {
            return Ok(Some(zero.len));
        }
        if self.pos < self.check_from {
            return Ok(None);
        }
        match self.src.hole_at(self.pos)? {
            HoleAt::Hole { end } => {
                self.hole_end = end;
                if room(end, self.pos, self.len) {
                    return Ok(Some(zero.len));
                }
                self.check_from = end;
            }
            HoleAt::Data { until } => self.check_from = until,
        }
        Ok(None)
    }

    fn fill(&mut self) -> std::io::Result<()> {
        if self.seek_pending {
            self.src.seek_to(self.pos)?;
            self.seek_pending = false;
        }
        while !self.eof && self.end - self.start < self.max {
            if self.buf.len() - self.end < self.max {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            match self.src.read(&mut self.buf[self.end..]) {
                Ok(0) => self.eof = true,
                Ok(n) => self.end += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

impl<R: Holes> Iterator for Chunker<'_, R> {
    type Item = std::io::Result<Piece>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.zero_here() {
            Ok(Some(len)) => {
                // What was read ahead lies in the hole: dropped, and the
                // reading goes on after the zero chunk.
                self.start = 0;
                self.end = 0;
                self.eof = false;
                self.pos += len as u64;
                self.seek_pending = true;
                return Some(Ok(Piece::Zeros(len)));
            }
            Ok(None) => {}
            Err(e) => return Some(Err(e)),
        }
        if let Err(e) = self.fill() {
            return Some(Err(e));
        }
        if self.start == self.end {
            return None;
        }
        let avail = &self.buf[self.start..self.end];
        let len = FastCDC::with_level_and_seed(
            avail,
            self.min,
            self.avg,
            self.max,
            Normalization::Level1,
            self.seed,
        )
        .next()
        .map_or(avail.len(), |c| c.length);
        let chunk = avail[..len].to_vec();
        self.start += len;
        self.pos += len as u64;
        Some(Ok(Piece::Data(chunk)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fastcdc::v2020::StreamCDC;

    fn params() -> ChunkerParams {
        ChunkerParams {
            algorithm: "fastcdc-2020".into(),
            min_size: 4096,
            avg_size: 16384,
            max_size: 65536,
        }
    }

    #[test]
    fn cut_points_equal_the_crates_stream_chunker() {
        let mut x: u64 = 42;
        let data: Vec<u8> = (0..1_000_000)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if (i / 50_000) % 3 == 0 {
                    0
                } else {
                    x as u8
                }
            })
            .collect();
        let p = params();
        let mut buf = Vec::new();
        for seed in [0u64, 12345] {
            let ours: Vec<usize> = Chunker::new(&data[..], &mut buf, &p, seed)
                .map(|c| c.map(|c| c.len()).unwrap_or(0))
                .collect();
            let theirs: Vec<usize> = StreamCDC::with_level_and_seed(
                &data[..],
                4096,
                16384,
                65536,
                Normalization::Level1,
                seed,
            )
            .map(|c| c.map(|c| c.length).unwrap_or(0))
            .collect();
            assert_eq!(ours, theirs);
            assert_eq!(ours.iter().sum::<usize>(), data.len());
        }
        // Reads in small pieces give the same cuts.
        struct Trickle<'a>(&'a [u8]);
        impl Read for Trickle<'_> {
            fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
                let n = out.len().min(777).min(self.0.len());
                out[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        impl Holes for Trickle<'_> {
            fn seek_to(&mut self, _: u64) -> std::io::Result<()> {
                unreachable!("no holes")
            }
        }
        let a = bytes(Chunker::new(Trickle(&data), &mut buf, &p, 7));
        let b = bytes(Chunker::new(&data[..], &mut Vec::new(), &p, 7));
        assert!(a == b);
        assert_eq!(Chunker::new(&b""[..], &mut buf, &p, 7).count(), 0);
    }

    fn bytes<R: Holes>(c: Chunker<'_, R>) -> Vec<Vec<u8>> {
        c.map(|p| match p.expect("chunk") {
            Piece::Data(d) => d,
            Piece::Zeros(n) => vec![0; n],
        })
        .collect()
    }

    fn noise(n: usize, mut x: u64) -> Vec<u8> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// A sparse file is cut exactly as its bytes read in full, its holes
    /// come out as zero chunks without being read, and a hole too short
    /// for a zero chunk, or one at the very end, is read as zeros.
    #[test]
    fn holes_are_skipped_with_the_cut_points_of_reading_them() {
        use std::os::unix::fs::MetadataExt;
        let p = params();
        let t = tempfile::tempdir().expect("tempdir");
        let path = t.path().join("sparse");
        let f = File::create(&path).expect("create");
        // data | 3 MiB hole | data | 20 KiB hole | data | 1 MiB hole to EOF
        let layout: [(u64, usize); 3] = [(0, 300_000), (3_500_000, 70_000), (3_590_000, 200_000)];
        for (i, (off, len)) in layout.iter().enumerate() {
            f.write_all_at(&noise(*len, i as u64 + 1), *off)
                .expect("write");
        }
        let size = 4_900_000u64;
        f.set_len(size).expect("truncate");
        let meta = f.metadata().expect("stat");
        assert!(
            meta.blocks() * 512 < size,
            "the test file system must keep holes"
        );
        let full = std::fs::read(&path).expect("read");

        let zero = ZeroChunk::new(&p, 9);
        let file = SparseFile::new(File::open(&path).expect("open"), true);
        let mut buf = Vec::new();
        let pieces: Vec<Piece> = Chunker::new(file, &mut buf, &p, 9)
            .skipping_holes(zero, size)
            .map(|c| c.expect("chunk"))
            .collect();
        let zeros = pieces
            .iter()
            .filter(|c| matches!(c, Piece::Zeros(_)))
            .count();
        let hole = 3_500_000 - 300_000;
        assert!(
            zeros >= hole / zero.len - 1 && zeros > 0,
            "{zeros} zero chunks"
        );
        let ours: Vec<Vec<u8>> = pieces
            .into_iter()
            .map(|c| match c {
                Piece::Data(d) => d,
                Piece::Zeros(n) => vec![0; n],
            })
            .collect();
        let theirs = bytes(Chunker::new(&full[..], &mut Vec::new(), &p, 9));
        assert_eq!(
            ours.iter().map(Vec::len).collect::<Vec<_>>(),
            theirs.iter().map(Vec::len).collect::<Vec<_>>()
        );
        assert!(ours == theirs);

        // All holes, no data: still the same cuts.
        let empty = t.path().join("empty");
        let f = File::create(&empty).expect("create");
        f.set_len(20 << 20).expect("truncate");
        let file = SparseFile::new(File::open(&empty).expect("open"), true);
        let ours = bytes(Chunker::new(file, &mut buf, &p, 9).skipping_holes(zero, 20 << 20));
        let full = vec![0u8; 20 << 20];
        assert!(ours == bytes(Chunker::new(&full[..], &mut Vec::new(), &p, 9)));
    }
}
