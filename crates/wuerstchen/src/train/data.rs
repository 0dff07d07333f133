//! A captioned image folder: `name.png` (or `.jpg`) + `name.txt` pairs, all of one size.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::image_io::{image_to_tensor, read_image};
use crate::noise::SeededRng;

/// All samples in memory as (3, S, S) floats in [0, 1] and their captions.
pub struct ImageFolder {
    pub images: Vec<Tensor>,
    pub captions: Vec<String>,
    pub size: usize,
}

fn bad(path: &Path, msg: &str) -> Error {
    Error::InvalidInput(format!("{}: {msg}", path.display()))
}

impl ImageFolder {
    /// Loads every `*.png` with its caption. Errors name the file: an empty folder, an
    /// image without caption, an unreadable image, a size other than the first
    /// image's or not `expected_size`.
    pub fn load(dir: &Path, expected_size: Option<usize>) -> Result<Self> {
        let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
        let mut files: Vec<PathBuf> = Vec::new();
        for e in entries {
            let p = e.map_err(|e| Error::io(dir, e))?.path();
            let ext = p
                .extension()
                .and_then(|x| x.to_str())
                .map(str::to_ascii_lowercase);
            if matches!(ext.as_deref(), Some("png" | "jpg" | "jpeg")) {
                files.push(p);
            }
        }
        files.sort();
        if files.is_empty() {
            return Err(bad(dir, "no .png or .jpg images in this folder"));
        }
        let mut folder = ImageFolder {
            images: Vec::with_capacity(files.len()),
            captions: Vec::with_capacity(files.len()),
            size: expected_size.unwrap_or(0),
        };
        for p in &files {
            let txt = p.with_extension("txt");
            let caption = std::fs::read_to_string(&txt)
                .map_err(|_| bad(p, &format!("image without caption (no {})", txt.display())))?;
            let img = read_image(p).map_err(|e| bad(p, &format!("unreadable image: {e}")))?;
            if folder.size == 0 {
                folder.size = img.width;
            }
            if img.width != folder.size || img.height != folder.size {
                return Err(bad(
                    p,
                    &format!(
                        "image is {}x{}, expected {s}x{s}",
                        img.width,
                        img.height,
                        s = folder.size
                    ),
                ));
            }
            folder.images.push(image_to_tensor(&img)?);
            folder.captions.push(caption.trim().to_string());
        }
        Ok(folder)
    }

    pub fn len(&self) -> usize {
        self.images.len()
    }

    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    /// A random batch (with replacement): images (B, 3, S, S) and captions.
    pub fn batch(
        &self,
        rng: &mut SeededRng,
        b: usize,
        device: &Device,
    ) -> Result<(Tensor, Vec<String>)> {
        let idx: Vec<usize> = (0..b)
            .map(|_| (rng.next_u64() % self.len() as u64) as usize)
            .collect();
        let imgs: Vec<&Tensor> = idx.iter().map(|&i| &self.images[i]).collect();
        let caps = idx.iter().map(|&i| self.captions[i].clone()).collect();
        Ok((Tensor::stack(&imgs, 0)?.to_device(device)?, caps))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image_io::read_png;

    #[test]
    fn reads_jpeg_samples_as_libjpeg_does() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/jpeg");
        let folder = ImageFolder::load(&root.join("data"), Some(32)).unwrap();
        assert_eq!(folder.captions, ["a red circle on a blue background"]);
        let ours: Vec<f32> = folder.images[0]
            .permute((1, 2, 0))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let reference = read_png(&root.join("libjpeg_decoded.png")).unwrap().image;
        assert_eq!(ours.len(), reference.data.len());
        // decoders may round their IDCT and chroma upsampling differently: a few levels
        let diffs: Vec<f32> = ours
            .iter()
            .zip(&reference.data)
            .map(|(a, &b)| (a * 255.0 - b as f32).abs())
            .collect();
        let max = diffs.iter().cloned().fold(0.0, f32::max);
        let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
        println!("JPEG vs libjpeg: mean {mean:.2} levels, max {max}");
        assert!(mean < 1.0 && max <= 12.0, "mean {mean} max {max}");
    }
}
