//! The small default model (`models/default`, trained on CPU by
//! `scripts/train_default_model.sh`), compiled into the library so that a fresh
//! checkout generates an image with no download and no flags.
//!
//! Generation reads diffusers folders through mmap, so the embedded files are written
//! once to a cache folder named after their content hash; later runs find it there. A
//! different model (another build) gets a different folder, and a half-written folder
//! is never seen: it is assembled under a temporary name and renamed into place.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

macro_rules! embed {
    ($path:literal) => {
        include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../models/default/",
            $path
        ))
    };
}

// one text encoder and tokenizer serve both pipelines (the trainer writes the same
// files into both folders)
const TEXT_ENCODER: &[u8] = embed!("prior/text_encoder/model.safetensors");
const TEXT_ENCODER_CONFIG: &[u8] = embed!("prior/text_encoder/config.json");
const VOCAB: &[u8] = embed!("prior/tokenizer/vocab.json");
const MERGES: &[u8] = embed!("prior/tokenizer/merges.txt");
const TOKENIZER_CONFIG: &[u8] = embed!("prior/tokenizer/tokenizer_config.json");
const SCHEDULER: &[u8] = embed!("prior/scheduler/scheduler_config.json");

/// Every file of the two pipeline folders, by path relative to `models/default`.
pub const FILES: &[(&str, &[u8])] = &[
    ("prior/model_index.json", embed!("prior/model_index.json")),
    ("prior/prior/config.json", embed!("prior/prior/config.json")),
    (
        "prior/prior/diffusion_pytorch_model.safetensors",
        embed!("prior/prior/diffusion_pytorch_model.safetensors"),
    ),
    ("prior/scheduler/scheduler_config.json", SCHEDULER),
    ("prior/text_encoder/config.json", TEXT_ENCODER_CONFIG),
    ("prior/text_encoder/model.safetensors", TEXT_ENCODER),
    ("prior/tokenizer/vocab.json", VOCAB),
    ("prior/tokenizer/merges.txt", MERGES),
    ("prior/tokenizer/tokenizer_config.json", TOKENIZER_CONFIG),
    (
        "decoder/model_index.json",
        embed!("decoder/model_index.json"),
    ),
    (
        "decoder/decoder/config.json",
        embed!("decoder/decoder/config.json"),
    ),
    (
        "decoder/decoder/diffusion_pytorch_model.safetensors",
        embed!("decoder/decoder/diffusion_pytorch_model.safetensors"),
    ),
    (
        "decoder/vqgan/config.json",
        embed!("decoder/vqgan/config.json"),
    ),
    (
        "decoder/vqgan/diffusion_pytorch_model.safetensors",
        embed!("decoder/vqgan/diffusion_pytorch_model.safetensors"),
    ),
    ("decoder/scheduler/scheduler_config.json", SCHEDULER),
    ("decoder/text_encoder/config.json", TEXT_ENCODER_CONFIG),
    ("decoder/text_encoder/model.safetensors", TEXT_ENCODER),
    ("decoder/tokenizer/vocab.json", VOCAB),
    ("decoder/tokenizer/merges.txt", MERGES),
    ("decoder/tokenizer/tokenizer_config.json", TOKENIZER_CONFIG),
];

/// The name the materialised folder (and so the PNG metadata) carries.
pub const NAME: &str = "wuerstchen-default";

/// 64-bit FNV-1a over every path and its bytes: a content address, not a checksum
/// against tampering.
pub fn content_hash() -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (path, bytes) in FILES {
        for chunk in [
            path.as_bytes(),
            &[0u8],
            bytes,
            &(bytes.len() as u64).to_le_bytes(),
        ] {
            for &b in chunk {
                h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
    }
    h
}

/// Where materialised models go: `$WUERSTCHEN_CACHE`, else `$XDG_CACHE_HOME/wuerstchen`,
/// else `~/.cache/wuerstchen`, else the system's temporary folder.
pub fn cache_root() -> PathBuf {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("WUERSTCHEN_CACHE")
        .or_else(|| var("XDG_CACHE_HOME").map(|p| p.join("wuerstchen")))
        .or_else(|| var("HOME").map(|p| p.join(".cache/wuerstchen")))
        .unwrap_or_else(|| std::env::temp_dir().join("wuerstchen"))
}

/// Writes the embedded model under `root` unless it is already there; returns the
/// folder that holds `prior/` and `decoder/`.
pub fn materialize_in(root: &Path) -> Result<PathBuf> {
    let dir = root.join(format!("{NAME}-{:016x}", content_hash()));
    if complete(&dir) {
        return Ok(dir);
    }
    std::fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
    // unique per process, so two first runs at once cannot interleave their files
    let staging = root.join(format!(".{NAME}-{}.tmp", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    let written = FILES.iter().try_for_each(|(rel, bytes)| {
        let path = staging.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))
    });
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    // an incomplete folder (interrupted by an older build, or damaged since) goes
    if dir.exists() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    if let Err(e) = std::fs::rename(&staging, &dir) {
        let _ = std::fs::remove_dir_all(&staging);
        // another process finished first: its copy is identical
        if !complete(&dir) {
            return Err(Error::io(&dir, e));
        }
    }
    Ok(dir)
}

/// `materialize_in(cache_root())`
pub fn materialize() -> Result<PathBuf> {
    materialize_in(&cache_root())
}

/// Every file present with its embedded size.
fn complete(dir: &Path) -> bool {
    FILES.iter().all(|(rel, bytes)| {
        std::fs::metadata(dir.join(rel)).is_ok_and(|m| m.len() == bytes.len() as u64)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embeds_every_file_of_the_model_folder() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/default");
        let mut on_disk = Vec::new();
        for part in ["prior", "decoder"] {
            collect(&root.join(part), &root, &mut on_disk);
        }
        on_disk.sort();
        let mut embedded: Vec<String> = FILES.iter().map(|(p, _)| p.to_string()).collect();
        embedded.sort();
        assert_eq!(embedded, on_disk);
        for (rel, bytes) in FILES {
            assert_eq!(&std::fs::read(root.join(rel)).unwrap(), bytes, "{rel}");
        }
    }

    #[test]
    fn materialises_once_and_repairs_a_damaged_copy() {
        let root = std::env::temp_dir().join(format!("wuerstchen-embed-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dir = materialize_in(&root).unwrap();
        for (rel, bytes) in FILES {
            assert_eq!(&std::fs::read(dir.join(rel)).unwrap(), bytes, "{rel}");
        }
        // no staging folder left behind, one model folder
        let names: Vec<_> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        // found again without writing: a marker file inside survives
        std::fs::write(dir.join("marker"), b"x").unwrap();
        assert_eq!(materialize_in(&root).unwrap(), dir);
        assert!(dir.join("marker").exists());
        // a truncated weight file is noticed and the folder rebuilt
        let weights = dir.join("decoder/vqgan/diffusion_pytorch_model.safetensors");
        std::fs::write(&weights, b"").unwrap();
        let again = materialize_in(&root).unwrap();
        assert_eq!(again, dir);
        assert!(complete(&again));
        std::fs::remove_dir_all(&root).unwrap();
    }

    fn collect(dir: &Path, root: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                collect(&p, root, out);
            } else {
                out.push(
                    p.strip_prefix(root)
                        .unwrap()
                        .to_string_lossy()
                        .replace('\\', "/"),
                );
            }
        }
    }
}
