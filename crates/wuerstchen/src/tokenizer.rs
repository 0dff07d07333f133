//! The CLIP BPE tokenizer on the `tokenizers` crate, called as the pipelines call
//! transformers' `CLIPTokenizer`: `padding="max_length", max_length=77,
//! truncation=True`.

use std::path::Path;

use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::error::{Error, Result};

pub const BOS: &str = "<|startoftext|>";
pub const EOS: &str = "<|endoftext|>";
/// The text encoders' context length.
pub const MAX_LENGTH: usize = 77;

/// CLIP's pre-tokenisation pattern (transformers' `CLIPTokenizer`).
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// Token ids and attention mask of a batch of prompts, each exactly 77 long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedBatch {
    pub input_ids: Vec<Vec<u32>>,
    pub attention_mask: Vec<Vec<u32>>,
}

#[derive(Clone)]
pub struct ClipTokenizer {
    inner: Tokenizer,
    bos: u32,
    eos: u32,
    /// transformers pads with `<|endoftext|>` unless the folder says otherwise
    pad: u32,
}

fn tok_err(context: &str, e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(format!("{context}: {e}"))
}

impl ClipTokenizer {
    /// Loads a `tokenizer/` folder: `tokenizer.json` if present, else `vocab.json` +
    /// `merges.txt`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        if json.is_file() {
            return Self::from_tokenizer_json(&json);
        }
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        if vocab.is_file() && merges.is_file() {
            return Self::from_vocab_merges(&vocab, &merges);
        }
        Err(Error::Tokenizer(format!(
            "no tokenizer in {}: expected tokenizer.json, or vocab.json and merges.txt",
            dir.display()
        )))
    }

    pub fn from_tokenizer_json(path: &Path) -> Result<Self> {
        let inner =
            Tokenizer::from_file(path).map_err(|e| tok_err(&path.display().to_string(), e))?;
        Self::with_tokenizer(inner)
    }

    /// Builds the same pipeline as transformers' `CLIPTokenizer.__init__`.
    pub fn from_vocab_merges(vocab: &Path, merges: &Path) -> Result<Self> {
        let path = |p: &Path| p.to_string_lossy().into_owned();
        let bpe = BPE::from_file(&path(vocab), &path(merges))
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".into())
            .unk_token(EOS.into())
            .fuse_unk(false)
            .build()
            .map_err(|e| tok_err(&format!("{} + {}", vocab.display(), merges.display()), e))?;
        let mut inner = Tokenizer::new(bpe);
        let normalizer = NormSequence::new(vec![
            NFC.into(),
            Replace::new(ReplacePattern::Regex(r"\s+".into()), " ")
                .map_err(|e| tok_err("normalizer", e))?
                .into(),
            Lowercase.into(),
        ]);
        inner
            .with_normalizer(Some(normalizer))
            .map_err(|e| tok_err("normalizer", e))?;
        let split = Split::new(
            SplitPattern::Regex(CLIP_PATTERN.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(|e| tok_err("pre-tokenizer", e))?;
        // pre_tokenizers.ByteLevel(add_prefix_space=False): trim_offsets and use_regex
        // keep their Python defaults (True).
        inner.with_pre_tokenizer(Some(PreSequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        inner
            .add_special_tokens([AddedToken::from(BOS, true), AddedToken::from(EOS, true)])
            .map_err(|e| tok_err("special tokens", e))?;
        Self::with_tokenizer(inner)
    }

    fn with_tokenizer(inner: Tokenizer) -> Result<Self> {
        let id = |t: &str| {
            inner.token_to_id(t).ok_or_else(|| {
                Error::Tokenizer(format!(
                    "the vocabulary has no {t} token: not a CLIP tokenizer"
                ))
            })
        };
        let (bos, eos) = (id(BOS)?, id(EOS)?);
        Ok(Self {
            bos,
            eos,
            pad: eos,
            inner,
        })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Ids of one prompt: `[bos] + first 75 tokens + [eos]`, padded with `<|endoftext|>`
    /// to 77, and the mask marking the unpadded part.
    pub fn encode(&self, prompt: &str) -> Result<(Vec<u32>, Vec<u32>)> {
        let enc = self
            .inner
            .encode(prompt, false)
            .map_err(|e| tok_err(&format!("cannot tokenize {prompt:?}"), e))?;
        let body = enc.get_ids();
        let keep = body.len().min(MAX_LENGTH - 2);
        let mut ids = Vec::with_capacity(MAX_LENGTH);
        ids.push(self.bos);
        ids.extend_from_slice(&body[..keep]);
        ids.push(self.eos);
        let mut mask = vec![1u32; ids.len()];
        mask.resize(MAX_LENGTH, 0);
        ids.resize(MAX_LENGTH, self.pad);
        Ok((ids, mask))
    }

    pub fn encode_batch(&self, prompts: &[&str]) -> Result<TokenizedBatch> {
        let mut batch = TokenizedBatch {
            input_ids: Vec::with_capacity(prompts.len()),
            attention_mask: Vec::with_capacity(prompts.len()),
        };
        for p in prompts {
            let (ids, mask) = self.encode(p)?;
            batch.input_ids.push(ids);
            batch.attention_mask.push(mask);
        }
        Ok(batch)
    }

    /// `encode_batch` as tensors: ids (B, 77) and attention mask (B, 77), both U32.
    pub fn encode_tensors(
        &self,
        prompts: &[&str],
        device: &candle_core::Device,
    ) -> Result<(candle_core::Tensor, candle_core::Tensor)> {
        let batch = self.encode_batch(prompts)?;
        Ok((
            candle_core::Tensor::new(batch.input_ids, device)?,
            candle_core::Tensor::new(batch.attention_mask, device)?,
        ))
    }
}
