//! Tokenizers: byte-level (vocab 256 + end-of-document, no files needed) and Hugging Face
//! `tokenizer.json` files through the `tokenizers` crate.

use std::path::Path;

pub enum Tokenizer {
    /// Bytes 0..=255 are tokens; 256 ends a document.
    Bytes,
    Hf {
        inner: Box<tokenizers::Tokenizer>,
        path: String,
        eod: u32,
        /// Fingerprint of the file, so a resume with a different tokenizer is refused.
        hash: u64,
    },
}

impl Tokenizer {
    pub fn load(path: &Path) -> Result<Tokenizer, String> {
        let bytes = std::fs::read(path)
            .map_err(|e| format!("cannot read tokenizer file {}: {e}", path.display()))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| {
            format!(
                "{} is not a Hugging Face tokenizer.json: {e}",
                path.display()
            )
        })?;
        let vocab = inner.get_vocab_size(true) as u32;
        let eod = ["<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[EOS]"]
            .iter()
            .find_map(|t| inner.token_to_id(t))
            .unwrap_or(vocab.saturating_sub(1));
        Ok(Tokenizer::Hf {
            inner: Box::new(inner),
            path: path.display().to_string(),
            eod,
            hash: xxhash_rust::xxh3::xxh3_64(&bytes),
        })
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Bytes => 257,
            Tokenizer::Hf { inner, .. } => inner.get_vocab_size(true),
        }
    }

    pub fn eod(&self) -> u32 {
        match self {
            Tokenizer::Bytes => 256,
            Tokenizer::Hf { eod, .. } => *eod,
        }
    }

    /// A short identity string stored in checkpoints and compared on resume.
    pub fn identity(&self) -> String {
        match self {
            Tokenizer::Bytes => "bytes".to_string(),
            Tokenizer::Hf { hash, inner, .. } => {
                format!("hf:{:016x}:vocab{}", hash, inner.get_vocab_size(true))
            }
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Tokenizer::Bytes => "byte-level (257 tokens)".to_string(),
            Tokenizer::Hf { path, .. } => {
                format!("{} ({} tokens)", path, self.vocab_size())
            }
        }
    }

    pub fn encode_into(&self, text: &str, out: &mut Vec<u32>) -> Result<(), String> {
        match self {
            Tokenizer::Bytes => {
                out.extend(text.as_bytes().iter().map(|&b| b as u32));
                Ok(())
            }
            Tokenizer::Hf { inner, .. } => {
                let enc = inner
                    .encode_fast(text, false)
                    .map_err(|e| format!("tokenizer failed: {e}"))?;
                out.extend_from_slice(enc.get_ids());
                Ok(())
            }
        }
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, String> {
        let mut v = Vec::new();
        self.encode_into(text, &mut v)?;
        Ok(v)
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        match self {
            Tokenizer::Bytes => {
                let bytes: Vec<u8> = ids.iter().filter(|&&t| t < 256).map(|&t| t as u8).collect();
                String::from_utf8_lossy(&bytes).into_owned()
            }
            Tokenizer::Hf { inner, .. } => inner.decode(ids, true).unwrap_or_default(),
        }
    }
}
