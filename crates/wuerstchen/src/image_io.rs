//! PNG output with the generation parameters embedded, and reading them back.

use std::io::Write;
use std::path::Path;

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};

/// The text chunk keyword Automatic1111 and most image viewers use.
pub const PARAMETERS_KEY: &str = "parameters";

/// An 8-bit RGB image, rows top to bottom.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

/// (B, 3, H, W) floats in any range -> 8-bit images, `round(clamp(x, 0, 1) * 255)` with
/// ties to even, in f32 as numpy does it.
pub fn tensor_to_images(images: &Tensor) -> Result<Vec<RgbImage>> {
    let (b, c, h, w) = images.dims4()?;
    if c != 3 {
        return Err(Error::InvalidInput(format!(
            "expected 3 image channels, got {c}"
        )));
    }
    // (B, 3, H, W) -> (B, H, W, 3)
    let hwc = images
        .to_dtype(DType::F32)?
        .permute((0, 2, 3, 1))?
        .contiguous()?;
    let flat = hwc.flatten_all()?.to_vec1::<f32>()?;
    let per = h * w * 3;
    Ok((0..b)
        .map(|i| RgbImage {
            width: w,
            height: h,
            data: flat[i * per..(i + 1) * per]
                .iter()
                .map(|&x| (x.clamp(0.0, 1.0) * 255.0).round_ties_even() as u8)
                .collect(),
        })
        .collect())
}

fn is_latin1(s: &str) -> bool {
    s.chars().all(|c| (c as u32) < 256)
}

/// One image as a (3, H, W) f32 tensor in [0, 1], the layout Stage A and the
/// semantic compressor read.
pub fn image_to_tensor(img: &RgbImage) -> Result<Tensor> {
    let data: Vec<f32> = img.data.iter().map(|&v| v as f32 / 255.0).collect();
    // (H, W, 3) -> (3, H, W)
    Ok(
        Tensor::from_vec(data, (img.height, img.width, 3), &candle_core::Device::Cpu)?
            .permute((2, 0, 1))?
            .contiguous()?,
    )
}

/// Encodes a PNG (8-bit RGB, not interlaced) with `parameters` as a tEXt chunk when
/// it is Latin-1, else as an iTXt chunk.
pub fn encode_png(image: &RgbImage, parameters: Option<&str>) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let err = |e: png::EncodingError| Error::InvalidInput(format!("PNG encoding failed: {e}"));
    {
        let mut enc = png::Encoder::new(&mut out, image.width as u32, image.height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        if let Some(text) = parameters {
            if is_latin1(text) {
                enc.add_text_chunk(PARAMETERS_KEY.into(), text.into())
                    .map_err(err)?;
            } else {
                enc.add_itxt_chunk(PARAMETERS_KEY.into(), text.into())
                    .map_err(err)?;
            }
        }
        let mut writer = enc.write_header().map_err(err)?;
        writer.write_image_data(&image.data).map_err(err)?;
        writer.finish().map_err(err)?;
    }
    Ok(out)
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename:
/// readers never see a partial file, and a failure leaves nothing behind.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path.file_name().ok_or_else(|| {
        Error::InvalidInput(format!("output path {} has no file name", path.display()))
    })?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// A decoded PNG and its text chunks.
pub struct DecodedPng {
    pub image: RgbImage,
    pub texts: Vec<(String, String)>,
}

/// Reads a PNG or JPEG (by extension) as 8-bit RGB: what training folders may hold.
pub fn read_image(path: &Path) -> Result<RgbImage> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    if !matches!(ext.as_deref(), Some("jpg" | "jpeg")) {
        return Ok(read_png(path)?.image);
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let options = zune_core::options::DecoderOptions::default()
        .jpeg_set_out_colorspace(zune_core::colorspace::ColorSpace::RGB);
    let mut decoder = zune_jpeg::JpegDecoder::new_with_options(&bytes, options);
    let data = decoder.decode().map_err(|e| {
        Error::InvalidInput(format!("{}: not a readable JPEG: {e:?}", path.display()))
    })?;
    let (width, height) = decoder
        .dimensions()
        .ok_or_else(|| Error::InvalidInput(format!("{}: JPEG without size", path.display())))?;
    if data.len() != width * height * 3 {
        return Err(Error::InvalidInput(format!(
            "{}: JPEG decoded to {} bytes, not {width}x{height} RGB",
            path.display(),
            data.len()
        )));
    }
    Ok(RgbImage {
        width,
        height,
        data,
    })
}

/// Reads an 8-bit RGB or RGBA PNG (alpha dropped) and its tEXt / zTXt / iTXt chunks.
pub fn read_png(path: &Path) -> Result<DecodedPng> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let bad = |m: String| Error::InvalidInput(format!("{}: {m}", path.display()));
    let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
    decoder.set_transformations(png::Transformations::EXPAND);
    let mut reader = decoder
        .read_info()
        .map_err(|e| bad(format!("not a readable PNG: {e}")))?;
    let mut buf = vec![0; reader.output_buffer_size()];
    let frame = reader
        .next_frame(&mut buf)
        .map_err(|e| bad(format!("not a readable PNG: {e}")))?;
    let (w, h) = (frame.width as usize, frame.height as usize);
    let channels = match frame.color_type {
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        other => return Err(bad(format!("color type {other:?} is not RGB"))),
    };
    if frame.bit_depth != png::BitDepth::Eight {
        return Err(bad(format!("bit depth {:?} is not 8", frame.bit_depth)));
    }
    let data = buf[..frame.buffer_size()]
        .chunks(channels)
        .flat_map(|px| px[..3].iter().copied())
        .collect();
    let info = reader.info();
    let mut texts: Vec<(String, String)> = info
        .uncompressed_latin1_text
        .iter()
        .map(|t| (t.keyword.clone(), t.text.clone()))
        .collect();
    for t in &info.compressed_latin1_text {
        if let Ok(text) = t.get_text() {
            texts.push((t.keyword.clone(), text));
        }
    }
    for t in &info.utf8_text {
        if let Ok(text) = t.get_text() {
            texts.push((t.keyword.clone(), text));
        }
    }
    Ok(DecodedPng {
        image: RgbImage {
            width: w,
            height: h,
            data,
        },
        texts,
    })
}

/// The `parameters` text of a PNG, if it has one.
pub fn read_parameters(path: &Path) -> Result<Option<String>> {
    Ok(read_png(path)?
        .texts
        .into_iter()
        .find(|(k, _)| k == PARAMETERS_KEY)
        .map(|(_, v)| v))
}
