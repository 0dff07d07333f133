//! The synthetic captioned dataset: coloured shapes on coloured backgrounds, one image
//! and a same-stem `.txt` caption per sample (the folder convention of Stable Cascade
//! and kohya's trainers).
//!
//! Captions follow one grammar:
//! `a [small|large] <color> <shape> [in the <position>] on a <color> background`,
//! and the two colours always differ. The foreground colour / shape pairs in
//! [`HELD_OUT`] never appear in a training set, so what a model does with them
//! measures generalisation rather than memory.

use std::path::Path;

use crate::error::{Error, Result};
use crate::image_io::{encode_png, write_atomically, RgbImage};
use crate::noise::SeededRng;

pub const COLORS: [(&str, [u8; 3]); 8] = [
    ("red", [220, 30, 30]),
    ("green", [30, 170, 40]),
    ("blue", [30, 60, 220]),
    ("yellow", [235, 215, 25]),
    ("cyan", [25, 205, 225]),
    ("magenta", [210, 35, 205]),
    ("white", [245, 245, 245]),
    ("black", [15, 15, 15]),
];
pub const SHAPES: [&str; 3] = ["circle", "square", "triangle"];
pub const POSITIONS: [&str; 5] = [
    "top left",
    "top right",
    "bottom left",
    "bottom right",
    "center",
];
pub const SIZES: [&str; 2] = ["small", "large"];

/// Index of "center" in `POSITIONS`: where a caption without a position puts its shape.
pub const CENTRE: usize = 4;

/// Where a shape of position `POSITIONS[p]` is centred, as fractions of width and height.
pub fn position_anchor(p: usize) -> (f64, f64) {
    match POSITIONS[p] {
        "top left" => (0.3, 0.3),
        "top right" => (0.7, 0.3),
        "bottom left" => (0.3, 0.7),
        "bottom right" => (0.7, 0.7),
        _ => (0.5, 0.5),
    }
}

/// (foreground colour, shape) pairs kept out of every training set.
pub const HELD_OUT: [(&str, &str); 3] = [
    ("cyan", "triangle"),
    ("magenta", "circle"),
    ("yellow", "square"),
];

/// One sample's content; `caption()` renders it in the grammar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeSpec {
    pub color: usize,
    pub shape: usize,
    pub background: usize,
    /// None: the default, between small and large
    pub size: Option<usize>,
    /// None: centred without saying so
    pub position: Option<usize>,
}

impl ShapeSpec {
    pub fn caption(&self) -> String {
        let mut s = String::from("a ");
        if let Some(z) = self.size {
            s += SIZES[z];
            s += " ";
        }
        s += &format!("{} {}", COLORS[self.color].0, SHAPES[self.shape]);
        if let Some(p) = self.position {
            s += &format!(" in the {}", POSITIONS[p]);
        }
        s += &format!(" on a {} background", COLORS[self.background].0);
        s
    }

    pub fn is_held_out(&self) -> bool {
        HELD_OUT.contains(&(COLORS[self.color].0, SHAPES[self.shape]))
    }

    /// Whether the shape sits in the middle of the image: no position, or "center".
    pub fn is_centred(&self) -> bool {
        self.position_or_centre() == CENTRE
    }

    /// Index into `POSITIONS` of where the shape is drawn (no position: "center").
    pub fn position_or_centre(&self) -> usize {
        self.position.unwrap_or(CENTRE)
    }

    /// Parses a caption of the grammar (the inverse of `caption`).
    pub fn parse(caption: &str) -> Option<Self> {
        let rest = caption.trim().strip_prefix("a ")?;
        let (rest, bg) = rest.strip_suffix(" background")?.rsplit_once(" on a ")?;
        let background = COLORS.iter().position(|c| c.0 == bg)?;
        let (rest, position) = match rest.split_once(" in the ") {
            Some((r, p)) => (r, Some(POSITIONS.iter().position(|x| *x == p)?)),
            None => (rest, None),
        };
        let words: Vec<&str> = rest.split(' ').collect();
        let (size, words) = match SIZES.iter().position(|s| *s == words[0]) {
            Some(z) => (Some(z), &words[1..]),
            None => (None, &words[..]),
        };
        let [color, shape] = words else { return None };
        Some(Self {
            color: COLORS.iter().position(|c| c.0 == *color)?,
            shape: SHAPES.iter().position(|s| s == shape)?,
            background,
            size,
            position,
        })
    }

    /// Draws a random spec; `held_out` chooses between the training and held-out pools.
    pub fn random(rng: &mut SeededRng, held_out: bool) -> Self {
        let pick = |rng: &mut SeededRng, n: usize| (rng.next_u64() % n as u64) as usize;
        loop {
            let color = pick(rng, COLORS.len());
            let background = pick(rng, COLORS.len());
            let spec = Self {
                color,
                shape: pick(rng, SHAPES.len()),
                background,
                size: (pick(rng, 3) > 0).then(|| pick(rng, SIZES.len())),
                position: (pick(rng, 2) > 0).then(|| pick(rng, POSITIONS.len())),
            };
            if color != background && spec.is_held_out() == held_out {
                return spec;
            }
        }
    }

    /// Renders the sample at `size` x `size` pixels (4x4 supersampled edges).
    pub fn render(&self, size: usize) -> RgbImage {
        let s = size as f64;
        let radius = s * match self.size {
            Some(0) => 0.14,
            Some(_) => 0.30,
            None => 0.22,
        };
        let (cx, cy) = position_anchor(self.position_or_centre());
        let (cx, cy) = (cx * s, cy * s);
        let inside = |x: f64, y: f64| -> bool {
            let (dx, dy) = (x - cx, y - cy);
            match SHAPES[self.shape] {
                "circle" => dx * dx + dy * dy <= radius * radius,
                "square" => dx.abs() <= radius * 0.886 && dy.abs() <= radius * 0.886,
                // upward equilateral triangle with its centroid at the centre
                _ => {
                    let h = radius * 1.5;
                    let top = -radius;
                    let t = (dy - top) / h; // 0 at the apex, 1 at the base
                    (0.0..=1.0).contains(&t) && dx.abs() <= t * h / 3f64.sqrt()
                }
            }
        };
        let fg = COLORS[self.color].1;
        let bg = COLORS[self.background].1;
        let mut data = Vec::with_capacity(size * size * 3);
        const SS: usize = 4;
        for py in 0..size {
            for px in 0..size {
                let mut hits = 0;
                for sy in 0..SS {
                    for sx in 0..SS {
                        let x = px as f64 + (sx as f64 + 0.5) / SS as f64;
                        let y = py as f64 + (sy as f64 + 0.5) / SS as f64;
                        hits += usize::from(inside(x, y));
                    }
                }
                let a = hits as f64 / (SS * SS) as f64;
                for c in 0..3 {
                    data.push((fg[c] as f64 * a + bg[c] as f64 * (1.0 - a)).round() as u8);
                }
            }
        }
        RgbImage {
            width: size,
            height: size,
            data,
        }
    }
}

/// Writes `count` samples (`00000.png` + `00000.txt`, ...) into `out`, never the
/// held-out pairs. Refuses a folder that already holds images, so nothing is
/// overwritten.
pub fn write_shapes_dataset(out: &Path, count: usize, size: usize, seed: u64) -> Result<()> {
    if count == 0 {
        return Err(Error::InvalidParameter(
            "count 0: give at least 1 sample".into(),
        ));
    }
    if !(16..=1024).contains(&size) {
        return Err(Error::InvalidParameter(format!(
            "size {size} is outside 16..=1024"
        )));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let occupied = std::fs::read_dir(out)
        .map_err(|e| Error::io(out, e))?
        .filter_map(|e| e.ok())
        .any(|e| {
            matches!(
                e.path().extension().and_then(|x| x.to_str()),
                Some("png" | "jpg" | "txt")
            )
        });
    if occupied {
        return Err(Error::InvalidParameter(format!(
            "{} already holds images or captions: choose an empty folder",
            out.display()
        )));
    }
    let mut rng = SeededRng::new(seed);
    for i in 0..count {
        let spec = ShapeSpec::random(&mut rng, false);
        let png = encode_png(&spec.render(size), None)?;
        write_atomically(&out.join(format!("{i:05}.png")), &png)?;
        write_atomically(&out.join(format!("{i:05}.txt")), spec.caption().as_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captions_round_trip_and_colors_differ() {
        let mut rng = SeededRng::new(1);
        for held in [false, true] {
            for _ in 0..500 {
                let spec = ShapeSpec::random(&mut rng, held);
                assert_ne!(spec.color, spec.background);
                assert_eq!(spec.is_held_out(), held);
                assert_eq!(
                    ShapeSpec::parse(&spec.caption()),
                    Some(spec.clone()),
                    "{}",
                    spec.caption()
                );
            }
        }
        assert_eq!(ShapeSpec::parse("a red circle"), None);
        assert_eq!(
            ShapeSpec::parse("a purple circle on a red background"),
            None
        );
    }

    #[test]
    fn rendering_puts_the_colors_where_the_caption_says() {
        let spec =
            ShapeSpec::parse("a large red square in the top left on a blue background").unwrap();
        let img = spec.render(64);
        let px = |x: usize, y: usize| &img.data[(y * 64 + x) * 3..(y * 64 + x) * 3 + 3];
        assert_eq!(px(19, 19), &COLORS[0].1, "shape centre");
        assert_eq!(px(60, 60), &COLORS[2].1, "far corner is background");
    }
}
