//! The official pipelines in the Hugging Face cache: found there and, with the `hub`
//! feature, downloaded into it, in the layout huggingface_hub writes
//! (`models--org--name/{blobs,refs,snapshots/<commit>}`), so that Python and this
//! binary share one cache.

use std::path::{Path, PathBuf};

use crate::pipeline::{DECODER_FOLDERS, PRIOR_FOLDERS};

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

/// `HF_HUB_OFFLINE` as huggingface_hub reads it: 1, on, yes or true, in any case.
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| ["1", "on", "yes", "true"].contains(&v.to_ascii_lowercase().as_str()))
}

fn repo_dir(cache: &Path, repo: &str) -> PathBuf {
    cache.join(format!("models--{}", repo.replace('/', "--")))
}

/// The snapshot of `repo` in `cache` that holds `marker` (a sub-folder), if any: the
/// one `refs/main` names (the revision downloaded last), else the newest.
pub fn cached_snapshot(cache: &Path, repo: &str, marker: &str) -> Option<PathBuf> {
    let root = repo_dir(cache, repo);
    let snapshots = root.join("snapshots");
    if let Ok(main) = std::fs::read_to_string(root.join("refs/main")) {
        let snap = snapshots.join(main.trim());
        if snap.join(marker).is_dir() {
            return Some(snap);
        }
    }
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(snapshots)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join(marker).is_dir())
        .map(|p| {
            (
                p.metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::UNIX_EPOCH),
                p,
            )
        })
        .collect();
    found.sort();
    found.pop().map(|(_, p)| p)
}

/// The sub-folders read from a repository whose pipeline holds `marker` (`prior` or
/// `decoder`): the ones the pipeline needs, and `scheduler/` (its config, when there).
pub fn folders_for(marker: &str) -> Vec<&'static str> {
    let needed = if marker == "prior" {
        PRIOR_FOLDERS
    } else {
        DECODER_FOLDERS
    };
    needed.iter().copied().chain(["scheduler"]).collect()
}

/// Of a repository's files, the ones a pipeline reads from `folders`:
/// `model_index.json` and, directly in each folder, its JSON and text files (configs,
/// tokenizer) and its safetensors weights, all without a variant tag. That is what
/// diffusers loads by default: not `*.fp16.safetensors` (`variant="fp16"`), nor
/// `.bin`, `.msgpack` or `.onnx` copies, each as large as the weights themselves.
pub fn needed_files<'a>(files: &'a [String], folders: &[&str]) -> Vec<&'a str> {
    files
        .iter()
        .map(String::as_str)
        .filter(|f| {
            if *f == "model_index.json" {
                return true;
            }
            let Some((folder, name)) = f.split_once('/') else {
                return false;
            };
            let kind = name.rsplit('.').next().unwrap_or("");
            folders.contains(&folder)
                && !name.contains('/')
                && ["json", "txt", "safetensors"].contains(&kind)
                && variant_tag(name).is_none()
        })
        .collect()
}

/// The variant tag of a file name in diffusers' naming, if any: `fp16` in
/// `diffusion_pytorch_model.fp16.safetensors`, `model.fp16-00001-of-00002.safetensors`
/// and `model.safetensors.index.fp16.json`; none in `model-00001-of-00002.safetensors`.
fn variant_tag(name: &str) -> Option<&str> {
    name.split('.')
        .skip(1)
        .map(|part| part.split('-').next().unwrap_or(part))
        .find(|part| !["safetensors", "index", "json", "txt"].contains(part))
}

#[cfg(feature = "hub")]
pub use download::download;

#[cfg(feature = "hub")]
mod download {
    use std::path::{Path, PathBuf};

    use hf_hub::api::sync::{ApiBuilder, ApiError};

    use super::{folders_for, needed_files, repo_dir};
    use crate::error::{Error, Result};

    /// The repository listing with its files' LFS ids (`?blobs=true`).
    #[derive(serde::Deserialize)]
    struct Listing {
        sha: String,
        siblings: Vec<Sibling>,
    }

    #[derive(serde::Deserialize)]
    struct Sibling {
        rfilename: String,
        #[serde(default)]
        lfs: Option<Lfs>,
    }

    #[derive(serde::Deserialize)]
    struct Lfs {
        sha256: String,
    }

    /// Brings the files of `repo`'s current revision that a pipeline holding `marker`
    /// reads into `cache` (those already there are not fetched again), with a
    /// progress bar per file when `progress`; returns the snapshot folder.
    ///
    /// It asks the hub for the file list each time, as diffusers does: a snapshot
    /// cut off half-way looks whole on disk, and the list is what tells. Weights kept
    /// in LFS are named in the cache by their sha256, which the list gives, so a new
    /// revision that leaves them alone (a README edit) links the blobs already there
    /// instead of fetching gigabytes again. `HF_ENDPOINT` names another hub (a
    /// mirror), `HF_TOKEN` or the cache's `token` file the token.
    pub fn download(repo: &str, marker: &str, cache: &Path, progress: bool) -> Result<PathBuf> {
        let endpoint =
            std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into());
        let failed = |doing: String, cause: String| Error::Download {
            repo: repo.to_string(),
            endpoint: endpoint.clone(),
            message: format!("{doing}: {cause}"),
        };
        // the builder reads the cache's token file; HF_TOKEN, when set, comes first
        let mut builder = ApiBuilder::from_cache(hf_hub::Cache::new(cache.to_path_buf()))
            .with_endpoint(endpoint.clone())
            .with_progress(progress)
            .with_retries(2);
        if let Some(token) = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty()) {
            builder = builder.with_token(Some(token));
        }
        let api = builder
            .build()
            .map_err(|e| failed("starting the client".into(), e.to_string()))?;
        let hub_repo = api.model(repo.to_string());
        let listing: Listing = hub_repo
            .info_request()
            .query("blobs", "true")
            .call()
            .map_err(|e| explained(status(&e), e.to_string()))
            .and_then(|r| r.into_string().map_err(|e| e.to_string()))
            .and_then(|text| serde_json::from_str(&text).map_err(|e| e.to_string()))
            .map_err(|e| failed("listing its files".into(), e))?;
        let files: Vec<String> = listing
            .siblings
            .iter()
            .map(|s| s.rfilename.clone())
            .collect();
        let needed = needed_files(&files, &folders_for(marker));
        let config = format!("{marker}/config.json");
        if !needed.contains(&config.as_str()) {
            return Err(failed(
                "listing its files".into(),
                format!("it has no {config}: not a Würstchen {marker} pipeline"),
            ));
        }
        let root = repo_dir(cache, repo);
        let snapshot = root.join("snapshots").join(&listing.sha);
        for file in needed {
            let pointer = snapshot.join(file);
            if pointer.is_file() {
                continue;
            }
            let sibling = listing.siblings.iter().find(|s| s.rfilename == file);
            if let Some(lfs) = sibling.and_then(|s| s.lfs.as_ref()) {
                if link_blob(&root, &lfs.sha256, file, &pointer) {
                    continue;
                }
            }
            let got = hub_repo.download(file).map_err(|e| {
                let code = match &e {
                    ApiError::RequestError(r) => status(r),
                    _ => None,
                };
                failed(
                    format!("downloading {file}"),
                    explained(code, e.to_string()),
                )
            })?;
            if !got.starts_with(&snapshot) {
                return Err(failed(
                    format!("downloading {file}"),
                    format!(
                        "the repository moved on from revision {} while downloading; run again",
                        listing.sha
                    ),
                ));
            }
        }
        // as huggingface_hub records the revision it fetched (hf-hub does so per
        // download; a revision whose files were all linked has had none)
        let refs = root.join("refs");
        std::fs::create_dir_all(&refs)
            .and_then(|_| std::fs::write(refs.join("main"), &listing.sha))
            .map_err(|e| failed("recording the revision".into(), e.to_string()))?;
        Ok(snapshot)
    }

    /// Points `pointer` (the snapshot's `file`) at the cached blob `sha256`, as the
    /// cache's other pointers do (a relative link); false where there is no such blob
    /// or no link could be made (then the file is downloaded).
    fn link_blob(root: &Path, sha256: &str, file: &str, pointer: &Path) -> bool {
        if !root.join("blobs").join(sha256).is_file() {
            return false;
        }
        // from the pointer's folder up through the file's folders, <commit>/ and
        // snapshots/ to the repository's root
        let up = "../".repeat(file.matches('/').count() + 2);
        let target = format!("{up}blobs/{sha256}");
        let Some(folder) = pointer.parent() else {
            return false;
        };
        #[cfg(unix)]
        let linked = std::fs::create_dir_all(folder)
            .and_then(|_| std::os::unix::fs::symlink(&target, pointer))
            .is_ok();
        #[cfg(not(unix))]
        let linked = {
            let _ = (folder, target);
            false
        };
        linked && pointer.is_file()
    }

    fn status(e: &ureq::Error) -> Option<u16> {
        match e {
            ureq::Error::Status(code, _) => Some(*code),
            _ => None,
        }
    }

    /// The client's error, with what a user can do about the statuses that say more
    /// than their number.
    fn explained(status: Option<u16>, message: String) -> String {
        match status {
            Some(401 | 403 | 404) => format!(
                "{message} (no such repository or file, or a private or gated one: set HF_TOKEN)"
            ),
            _ => message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needed_files_are_a_pipelines_configs_and_plain_safetensors() {
        let files: Vec<String> = [
            ".gitattributes",
            "README.md",
            "model_index.json",
            "prior/config.json",
            "prior/diffusion_pytorch_model.safetensors",
            "prior/diffusion_pytorch_model.fp16.safetensors",
            "prior/diffusion_pytorch_model.bin",
            "text_encoder/config.json",
            "text_encoder/model-00001-of-00002.safetensors",
            "text_encoder/model-00002-of-00002.safetensors",
            "text_encoder/model.safetensors.index.json",
            "text_encoder/model.fp16-00001-of-00002.safetensors",
            "text_encoder/model.safetensors.index.fp16.json",
            "text_encoder/flax_model.msgpack",
            "tokenizer/merges.txt",
            "tokenizer/vocab.json",
            "tokenizer/special_tokens_map.json",
            "scheduler/scheduler_config.json",
            "decoder/config.json",
            "prior/nested/config.json",
        ]
        .map(String::from)
        .to_vec();
        let got = needed_files(&files, &folders_for("prior"));
        assert_eq!(
            got,
            [
                "model_index.json",
                "prior/config.json",
                "prior/diffusion_pytorch_model.safetensors",
                "text_encoder/config.json",
                "text_encoder/model-00001-of-00002.safetensors",
                "text_encoder/model-00002-of-00002.safetensors",
                "text_encoder/model.safetensors.index.json",
                "tokenizer/merges.txt",
                "tokenizer/vocab.json",
                "tokenizer/special_tokens_map.json",
                "scheduler/scheduler_config.json",
            ]
        );
        let decoder = needed_files(&files, &folders_for("decoder"));
        assert!(decoder.contains(&"decoder/config.json"), "{decoder:?}");
        assert!(!decoder.contains(&"prior/config.json"), "{decoder:?}");
    }

    #[test]
    fn the_snapshot_refs_main_names_wins_over_a_newer_one() {
        let cache = std::env::temp_dir().join(format!("wuerstchen-hub-{}", std::process::id()));
        let root = repo_dir(&cache, "org/name");
        for snap in ["aaa", "bbb"] {
            std::fs::create_dir_all(root.join("snapshots").join(snap).join("prior")).unwrap();
        }
        std::fs::create_dir_all(root.join("snapshots/ccc")).unwrap();
        // without refs/main: the newest that holds the marker ("ccc" does not)
        let newest = cached_snapshot(&cache, "org/name", "prior").unwrap();
        assert_eq!(newest, root.join("snapshots/bbb"));
        std::fs::create_dir_all(root.join("refs")).unwrap();
        std::fs::write(root.join("refs/main"), "aaa").unwrap();
        let main = cached_snapshot(&cache, "org/name", "prior").unwrap();
        assert_eq!(main, root.join("snapshots/aaa"));
        assert_eq!(cached_snapshot(&cache, "org/name", "decoder"), None);
        assert_eq!(cached_snapshot(&cache, "org/other", "prior"), None);
        std::fs::remove_dir_all(cache).unwrap();
    }
}
