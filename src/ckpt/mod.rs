//! Checkpoint files: one safetensors file (tensors `model.*`, `optim.m.*`, `optim.v.*`) with a
//! JSON metadata entry `wick`, written atomically (temp file in the same directory → write →
//! fsync → rename → fsync the directory). A checksum of the tensor bytes is verified on load.

pub mod meta;

pub use meta::CkptMeta;

use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

const CHECKSUM_PLACEHOLDER: &str = "xxh3:0000000000000000";

/// The temp file being written right now, so an abort (third Ctrl+C) can remove it.
pub static WRITING: Mutex<Option<PathBuf>> = Mutex::new(None);

#[derive(Debug)]
pub struct SaveError {
    pub path: PathBuf,
    pub cause: String,
}

impl std::fmt::Display for SaveError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cannot write checkpoint {}: {}",
            self.path.display(),
            self.cause
        )
    }
}

pub struct SaveReport {
    pub bytes: u64,
    pub seconds: f64,
}

pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp.{}", std::process::id()))
}

/// Remove temp files that a killed run left beside `path` (their writer is gone).
pub fn sweep_stale(path: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return removed;
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let prefix = format!(".{}.tmp.", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return removed;
    };
    for entry in entries.flatten() {
        let fname = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = fname
            .strip_prefix(&prefix)
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if (pid == std::process::id() as i32 || !process_alive(pid))
            && std::fs::remove_file(entry.path()).is_ok()
        {
            removed.push(entry.path());
        }
    }
    removed
}

fn process_alive(pid: i32) -> bool {
    // Signal 0 checks existence without sending anything.
    unsafe { libc::kill(pid, 0) == 0 || *libc::__errno_location() != libc::ESRCH }
}

/// Write `tensors` and `meta` to `path` atomically. On failure the temp file is removed and an
/// existing file at `path` is untouched.
pub fn save(
    path: &Path,
    meta: &mut CkptMeta,
    tensors: &[(String, Tensor)],
) -> Result<SaveReport, SaveError> {
    let t0 = Instant::now();
    let err = |cause: String| SaveError {
        path: path.to_path_buf(),
        cause,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir)
        .map_err(|e| err(format!("cannot create directory {}: {e}", dir.display())))?;

    // Bring tensors to the CPU once (a no-op there) and checksum their bytes in place: the
    // checksum goes into the header, which precedes them. No copies of the weights are made.
    let mut cpu = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t
            .to_device(&Device::Cpu)
            .and_then(|t| t.contiguous())
            .map_err(|e| err(format!("tensor {name}: {e}")))?;
        cpu.push((name.as_str(), t));
    }
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, t) in &cpu {
        let len = with_bytes(t, |b| b.len()).map_err(|e| err(format!("tensor {name}: {e}")))?;
        let dt = match t.dtype() {
            candle_core::DType::F32 => "F32",
            candle_core::DType::BF16 => "BF16",
            candle_core::DType::F16 => "F16",
            candle_core::DType::F64 => "F64",
            candle_core::DType::U32 => "U32",
            other => return Err(err(format!("unsupported dtype {other:?} for {name}"))),
        };
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dt, "shape": t.dims(), "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    // The checksum is hashed in the same pass that writes the bytes, then patched into this
    // fixed-width placeholder: one pass over the weights instead of two.
    meta.checksum = CHECKSUM_PLACEHOLDER.to_string();
    let meta_json = serde_json::to_string(meta).map_err(|e| err(format!("metadata: {e}")))?;
    header.insert(
        "__metadata__".into(),
        serde_json::json!({ "wick": meta_json, "format": "pt" }),
    );
    let mut header_bytes = serde_json::to_vec(&header).map_err(|e| err(format!("header: {e}")))?;
    while header_bytes.len() % 8 != 0 {
        header_bytes.push(b' ');
    }

    let placeholder_at = header_bytes
        .windows(CHECKSUM_PLACEHOLDER.len())
        .rposition(|w| w == CHECKSUM_PLACEHOLDER.as_bytes())
        .ok_or_else(|| err("checksum placeholder missing from header".into()))?;
    let tmp = temp_path(path);
    if let Ok(mut w) = WRITING.lock() {
        *w = Some(tmp.clone());
    }
    let result = (|| -> std::io::Result<u64> {
        let file = File::create(&tmp)?;
        let mut w = std::io::BufWriter::with_capacity(8 << 20, file);
        w.write_all(&(header_bytes.len() as u64).to_le_bytes())?;
        w.write_all(&header_bytes)?;
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        for (_, t) in &cpu {
            with_bytes(t, |b| {
                hasher.update(b);
                w.write_all(b)
            })
            .map_err(std::io::Error::other)??;
        }
        let mut file = w.into_inner().map_err(|e| e.into_error())?;
        let sum = format!("xxh3:{:016x}", hasher.digest());
        file.seek(SeekFrom::Start(8 + placeholder_at as u64))?;
        file.write_all(sum.as_bytes())?;
        meta.checksum = sum;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)?;
        File::open(&dir)?.sync_all()?;
        Ok(8 + header_bytes.len() as u64 + offset as u64)
    })();
    if let Ok(mut w) = WRITING.lock() {
        *w = None;
    }
    match result {
        Ok(bytes) => Ok(SaveReport {
            bytes,
            seconds: t0.elapsed().as_secs_f64(),
        }),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(err(e.to_string()))
        }
    }
}

/// Run `f` on the raw little-endian bytes of a contiguous CPU tensor, without copying them.
fn with_bytes<R>(t: &Tensor, f: impl FnOnce(&[u8]) -> R) -> Result<R, String> {
    use candle_core::{CpuStorage, Storage};
    fn bytes_of<T>(v: &[T]) -> &[u8] {
        // SAFETY: plain numeric types without padding; the byte view lives as long as `v`.
        unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
    }
    let (storage, layout) = t.storage_and_layout();
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or("tensor is not contiguous")?;
    match &*storage {
        Storage::Cpu(CpuStorage::F32(v)) => Ok(f(bytes_of(&v[start..end]))),
        Storage::Cpu(CpuStorage::F64(v)) => Ok(f(bytes_of(&v[start..end]))),
        Storage::Cpu(CpuStorage::BF16(v)) => Ok(f(bytes_of(&v[start..end]))),
        Storage::Cpu(CpuStorage::F16(v)) => Ok(f(bytes_of(&v[start..end]))),
        Storage::Cpu(CpuStorage::U32(v)) => Ok(f(bytes_of(&v[start..end]))),
        _ => Err("unsupported tensor storage for checkpoints".into()),
    }
}

pub struct Checkpoint {
    pub path: PathBuf,
    pub meta: CkptMeta,
    pub tensors: BTreeMap<String, Tensor>,
    pub file_size: u64,
}

impl Checkpoint {
    /// Tensors under a prefix (`model.`, `optim.m.`, ...), with the prefix removed.
    pub fn group(&self, prefix: &str) -> BTreeMap<String, Tensor> {
        self.tensors
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(prefix).map(|n| (n.to_string(), v.clone())))
            .collect()
    }
}

/// Read and verify a checkpoint. Every failure is a message naming the file and what is wrong.
pub fn load(path: &Path) -> Result<Checkpoint, String> {
    let bytes = std::fs::read(path)
        .map_err(|e| format!("cannot read checkpoint {}: {e}", path.display()))?;
    let meta = read_meta(path, &bytes)?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| format!("{} is not a valid safetensors file: {e}", path.display()))?;
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap_or([0; 8])) as usize;
    let data = &bytes[8 + n..];
    let sum = format!("xxh3:{:016x}", xxhash_rust::xxh3::xxh3_64(data));
    if sum != meta.checksum {
        return Err(format!(
            "checkpoint {} is corrupt: checksum of tensor bytes is {sum}, the file records {} (was it modified or partly copied?)",
            path.display(),
            meta.checksum
        ));
    }
    let mut tensors = BTreeMap::new();
    for (name, view) in st.tensors() {
        let t = candle_core::safetensors::Load::load(&view, &Device::Cpu)
            .map_err(|e| format!("checkpoint {}: tensor {name}: {e}", path.display()))?;
        tensors.insert(name, t);
    }
    Ok(Checkpoint {
        path: path.to_path_buf(),
        meta,
        tensors,
        file_size: bytes.len() as u64,
    })
}

/// Only the metadata (cheap: reads the header).
pub fn read_meta(path: &Path, bytes: &[u8]) -> Result<CkptMeta, String> {
    let bad = |why: &str| format!("{} is not a wick checkpoint: {why}", path.display());
    if bytes.len() < 8 {
        return Err(bad(
            "file is shorter than a safetensors header (truncated?)",
        ));
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap_or([0; 8]));
    if n > bytes.len() as u64 - 8 || n > 100 << 20 {
        return Err(bad(
            "header length is past the end of the file (truncated, or not safetensors)",
        ));
    }
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n as usize])
        .map_err(|e| bad(&format!("header is not JSON ({e})")))?;
    let meta = header
        .get("__metadata__")
        .and_then(|m| m.get("wick"))
        .and_then(|m| m.as_str())
        .ok_or_else(|| bad("no `wick` metadata entry (a safetensors file from another tool?)"))?;
    serde_json::from_str(meta).map_err(|e| bad(&format!("metadata does not parse ({e})")))
}

/// Metadata of the checkpoint at `path` if one is there and readable (reads only the header).
pub fn peek(path: &Path) -> Option<CkptMeta> {
    use std::io::Read;
    let mut f = File::open(path).ok()?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).ok()?;
    let n = u64::from_le_bytes(len).min(100 << 20) as usize;
    let mut buf = vec![0u8; 8 + n];
    buf[..8].copy_from_slice(&len);
    f.read_exact(&mut buf[8..]).ok()?;
    read_meta(path, &buf).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> CkptMeta {
        serde_json::from_value(serde_json::json!({
            "format_version": meta::FORMAT_VERSION, "wick_version": "0", "reason": "completed",
            "step": 7, "tokens_seen": 56, "loss": 1.5, "lr": 0.001,
            "model": crate::model::ModelConfig::preset("tiny").unwrap(),
            "optim": crate::train::AdamWConfig::default(), "optim_step": 7, "seed": 1,
            "run_id": "r", "started_unix": 0.0, "saved_unix": 0.0, "device": "cpu",
            "checksum": ""
        }))
        .unwrap()
    }

    fn tensors() -> Vec<(String, Tensor)> {
        let a = Tensor::from_vec((0..12).map(|x| x as f32).collect(), (3, 4), &Device::Cpu);
        let b = Tensor::from_vec(vec![1.5f32, -2.0], 2, &Device::Cpu);
        vec![
            ("model.a".into(), a.unwrap()),
            ("optim.m.a".into(), b.unwrap()),
        ]
    }

    /// The file is plain safetensors: an 8-byte little-endian header length, an 8-aligned JSON
    /// header with the tensors' offsets and the metadata under `__metadata__.wick`, then the
    /// bytes, whose checksum the metadata records.
    #[test]
    fn header_is_safetensors_with_wick_metadata_and_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("full_model.ckpt");
        let mut m = meta();
        let report = save(&path, &mut m, &tensors()).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(report.bytes, bytes.len() as u64);
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!(n % 8, 0, "header padded to 8 bytes");
        let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        assert_eq!(header["model.a"]["dtype"], "F32");
        assert_eq!(header["model.a"]["shape"], serde_json::json!([3, 4]));
        assert_eq!(
            header["model.a"]["data_offsets"],
            serde_json::json!([0, 48])
        );
        assert_eq!(
            header["optim.m.a"]["data_offsets"],
            serde_json::json!([48, 56])
        );
        let sum = format!("xxh3:{:016x}", xxhash_rust::xxh3::xxh3_64(&bytes[8 + n..]));
        assert_eq!(m.checksum, sum);
        let loaded = load(&path).unwrap();
        assert_eq!(loaded.meta.step, 7);
        assert_eq!(loaded.meta.checksum, sum);
        let a: Vec<f32> = loaded.group("model.")["a"]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(a, (0..12).map(|x| x as f32).collect::<Vec<_>>());
        assert!(safetensors::SafeTensors::deserialize(&bytes).is_ok());
        assert_eq!(peek(&path).unwrap().step, 7);
        assert!(!temp_path(&path).exists(), "no temp file left");
    }

    #[test]
    fn a_flipped_byte_or_a_truncated_file_is_named_not_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("full_model.ckpt");
        save(&path, &mut meta(), &tensors()).unwrap();
        let good = std::fs::read(&path).unwrap();
        let mut flipped = good.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        std::fs::write(&path, &flipped).unwrap();
        let e = load(&path).err().unwrap();
        assert!(
            e.contains("corrupt") && e.contains("full_model.ckpt"),
            "{e}"
        );
        std::fs::write(&path, &good[..good.len() / 2]).unwrap();
        assert!(load(&path).is_err());
        std::fs::write(&path, &good[..5]).unwrap();
        let e = load(&path).err().unwrap();
        assert!(e.contains("truncated"), "{e}");
    }
}
