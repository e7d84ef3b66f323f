//! Content-defined chunking of a byte stream (FastCDC 2020, seeded).
//!
//! Cut points are exactly those of `fastcdc::v2020::StreamCDC` with the same
//! parameters and seed, but the read buffer belongs to the caller and is
//! reused across files: the crate's stream chunker allocates and zero-fills
//! a max-size buffer per file and per chunk, which dominated the CPU profile
//! of backups with many small files.

use std::io::Read;

use fastcdc::v2020::{FastCDC, Normalization};

use crate::format::ChunkerParams;

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
}

impl<'b, R: Read> Chunker<'b, R> {
    /// `buf` is scratch space kept by the caller between files.
    pub fn new(src: R, buf: &'b mut Vec<u8>, params: &ChunkerParams, seed: u64) -> Self {
        let max = params.max_size as usize;
        if buf.len() < 2 * max {
            buf.resize(2 * max, 0);
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
        }
    }

    fn fill(&mut self) -> std::io::Result<()> {
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

impl<R: Read> Iterator for Chunker<'_, R> {
    type Item = std::io::Result<Vec<u8>>;

    fn next(&mut self) -> Option<Self::Item> {
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
        Some(Ok(chunk))
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
        let a: Vec<Vec<u8>> = Chunker::new(Trickle(&data), &mut buf, &p, 7)
            .map(|c| c.unwrap_or_default())
            .collect();
        let b: Vec<Vec<u8>> = Chunker::new(&data[..], &mut Vec::new(), &p, 7)
            .map(|c| c.unwrap_or_default())
            .collect();
        assert!(a == b);
        assert_eq!(Chunker::new(&b""[..], &mut buf, &p, 7).count(), 0);
    }
}
