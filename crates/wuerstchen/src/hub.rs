//! Finding the official pipelines in a local Hugging Face cache (no network).

use std::path::{Path, PathBuf};

pub const PRIOR_REPO: &str = "warp-ai/wuerstchen-prior";
pub const DECODER_REPO: &str = "warp-ai/wuerstchen";

/// The hub cache folder, as huggingface_hub resolves it.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        return Some(PathBuf::from(p).join("hub"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub"))
}

/// The snapshot of `repo` in `cache` that holds `marker` (a sub-folder), if any.
pub fn cached_snapshot(cache: &Path, repo: &str, marker: &str) -> Option<PathBuf> {
    let snapshots = cache
        .join(format!("models--{}", repo.replace('/', "--")))
        .join("snapshots");
    let mut found: Vec<PathBuf> = std::fs::read_dir(snapshots)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join(marker).is_dir())
        .collect();
    found.sort();
    found.pop()
}
