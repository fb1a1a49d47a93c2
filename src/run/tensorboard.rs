//! TensorBoard event files, so `tensorboard --logdir <ckpt-dir>/tb` shows a run's scalars live.
//!
//! The format is small enough to write by hand: a file of TFRecords (length, masked CRC-32C of
//! the length, an `Event` protobuf, masked CRC-32C of it), the first event carrying the file
//! version, every other one a step and a `Summary` of scalar values. Only the protobuf fields
//! wick uses are encoded: Event { wall_time = 1 (double), step = 2 (int64), file_version = 3
//! (string), summary = 5 }, Summary { value = 1 (repeated) }, Value { tag = 1 (string),
//! simple_value = 2 (float) }.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// CRC-32C (Castagnoli), bitwise: a few hundred bytes per step need no table.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// TFRecord's masked CRC.
pub fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn key(field: u32, wire: u8, out: &mut Vec<u8>) {
    varint(((field as u64) << 3) | wire as u64, out);
}

fn bytes_field(field: u32, bytes: &[u8], out: &mut Vec<u8>) {
    key(field, 2, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// An `Event` with a wall time and, either the file version or a step with scalar values.
pub fn event(
    wall_time: f64,
    step: Option<i64>,
    version: Option<&str>,
    scalars: &[(&str, f32)],
) -> Vec<u8> {
    let mut e = Vec::new();
    key(1, 1, &mut e);
    e.extend_from_slice(&wall_time.to_le_bytes());
    if let Some(step) = step {
        key(2, 0, &mut e);
        varint(step as u64, &mut e);
    }
    if let Some(v) = version {
        bytes_field(3, v.as_bytes(), &mut e);
    }
    if !scalars.is_empty() {
        let mut summary = Vec::new();
        for (tag, v) in scalars {
            let mut value = Vec::new();
            bytes_field(1, tag.as_bytes(), &mut value);
            key(2, 5, &mut value);
            value.extend_from_slice(&v.to_le_bytes());
            bytes_field(1, &value, &mut summary);
        }
        bytes_field(5, &summary, &mut e);
    }
    e
}

/// One TFRecord around `data`.
pub fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut r = Vec::with_capacity(data.len() + 16);
    r.extend_from_slice(&len);
    r.extend_from_slice(&masked_crc(&len).to_le_bytes());
    r.extend_from_slice(data);
    r.extend_from_slice(&masked_crc(data).to_le_bytes());
    r
}

/// An open event file.
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// A new `events.out.tfevents.<time>.<host>.<pid>` file in `dir`.
    pub fn create(dir: &Path) -> std::io::Result<EventWriter> {
        std::fs::create_dir_all(dir)?;
        let now = crate::ckpt::meta::now_unix();
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        let path = dir.join(format!(
            "events.out.tfevents.{}.{host}.{}",
            now as u64,
            std::process::id()
        ));
        let mut out = BufWriter::new(File::create(&path)?);
        out.write_all(&record(&event(now, None, Some("brain.Event:2"), &[])))?;
        Ok(EventWriter { path, out })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn scalars(&mut self, step: u64, scalars: &[(&str, f32)]) -> std::io::Result<()> {
        let e = event(
            crate::ckpt::meta::now_unix(),
            Some(step as i64),
            None,
            scalars,
        );
        self.out.write_all(&record(&e))
    }

    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_values() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }
}
