//! A simple deterministic analyser of shape images: what the default model is judged
//! by. Background = the palette colour nearest the border pixels' median; foreground =
//! pixels far from it; its mean colour names the shape's colour, and how much of its
//! bounding box it fills names the shape (square ~1, circle ~pi/4, triangle ~1/2).

use crate::dataset::{COLORS, SHAPES};
use crate::image_io::RgbImage;

#[derive(Debug, Clone, PartialEq)]
pub struct Analysis {
    /// indices into `COLORS` / `SHAPES`; None where nothing stands out
    pub background: usize,
    pub color: Option<usize>,
    pub shape: Option<usize>,
    /// foreground share of the image and of its bounding box
    pub coverage: f64,
    pub fill: f64,
}

fn nearest_color(c: [f64; 3]) -> usize {
    let d = |p: &[u8; 3]| (0..3).map(|i| (c[i] - p[i] as f64).powi(2)).sum::<f64>();
    (0..COLORS.len())
        .min_by(|&a, &b| d(&COLORS[a].1).total_cmp(&d(&COLORS[b].1)))
        .unwrap_or(0)
}

pub fn analyse(img: &RgbImage) -> Analysis {
    let (w, h) = (img.width, img.height);
    let px = |x: usize, y: usize| -> [f64; 3] {
        let i = (y * w + x) * 3;
        [
            img.data[i] as f64,
            img.data[i + 1] as f64,
            img.data[i + 2] as f64,
        ]
    };
    // per-channel median of the border
    let mut border: Vec<[f64; 3]> = Vec::new();
    for x in 0..w {
        border.push(px(x, 0));
        border.push(px(x, h - 1));
    }
    for y in 0..h {
        border.push(px(0, y));
        border.push(px(w - 1, y));
    }
    let median = |c: usize| {
        let mut v: Vec<f64> = border.iter().map(|p| p[c]).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let bg = [median(0), median(1), median(2)];
    let background = nearest_color(bg);
    // foreground: far from the background colour
    let (mut n, mut sum) = (0usize, [0f64; 3]);
    let (mut x0, mut y0, mut x1, mut y1) = (w, h, 0, 0);
    for y in 0..h {
        for x in 0..w {
            let p = px(x, y);
            let d = ((0..3).map(|i| (p[i] - bg[i]).powi(2)).sum::<f64>()).sqrt();
            if d > 80.0 {
                n += 1;
                for i in 0..3 {
                    sum[i] += p[i];
                }
                (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
            }
        }
    }
    let coverage = n as f64 / (w * h) as f64;
    if n < 8 {
        return Analysis {
            background,
            color: None,
            shape: None,
            coverage,
            fill: 0.0,
        };
    }
    let mean = sum.map(|s| s / n as f64);
    let fill = n as f64 / ((x1 - x0 + 1) * (y1 - y0 + 1)) as f64;
    let shape = if fill > 0.9 {
        1 // square
    } else if fill > 0.63 {
        0 // circle
    } else {
        2 // triangle
    };
    debug_assert_eq!(SHAPES[1], "square");
    Analysis {
        background,
        color: Some(nearest_color(mean)),
        shape: Some(shape),
        coverage,
        fill,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::ShapeSpec;
    use crate::noise::SeededRng;

    #[test]
    fn reads_the_dataset_it_was_written_for() {
        let mut rng = SeededRng::new(5);
        let (mut color, mut bg, mut shape) = (0, 0, 0);
        let n = 200;
        for i in 0..n {
            let spec = ShapeSpec::random(&mut rng, i % 4 == 0);
            let a = analyse(&spec.render(128));
            color += usize::from(a.color == Some(spec.color));
            bg += usize::from(a.background == spec.background);
            shape += usize::from(a.shape == Some(spec.shape));
        }
        println!("ground truth: color {color}/{n}, background {bg}/{n}, shape {shape}/{n}");
        assert!(bg == n && color >= n * 97 / 100 && shape >= n * 90 / 100);
    }
}
