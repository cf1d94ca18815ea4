//! Procedurally drawn scenes with English and Chinese captions: the training data of the drawn
//! tiny model ([`crate::tiny`]) and the yardstick its pictures are measured with.
//!
//! Owns the scene grammar ([`Scene`], [`Scene::caption`]), the drawing ([`Scene::render`], with
//! tiny-skia, anti-aliased), the held-out combinations ([`is_held_out`]) and the pixel measure
//! of adherence ([`check_adherence`]).
//!
//! # Grammar
//!
//! A scene is a background and one or two shapes; the caption says all of it:
//!
//! ```text
//! scene      = first [relation second] background
//! first      = "a" size color shape [position]       (position only when there is no second)
//! second     = "a" size color shape
//! size       = "small" | "large"
//! color      = red | green | blue | yellow | purple | orange | white | black
//! shape      = circle | square | triangle | star | ring
//! position   = "on the left" | "on the right" | "at the top" | "at the bottom" | "in the center"
//! relation   = "above" | "below" | "to the left of" | "to the right of"
//! background = "on a" color "background" | "on a" color "and" color "background"
//! ```
//!
//! e.g. `a small red circle above a large blue square on a yellow background`. Two colors in the
//! background mean the top half in the first and the bottom half in the second. With a relation
//! the first shape sits at the relation's side (above → top, below → bottom, to the left of →
//! left, to the right of → right) and the second on the opposite side. The Chinese caption says
//! the same in Chinese word order, background first:
//! `黄色背景上，一个红色小圆在一个蓝色大方块的上方`, `黄色背景上，一个红色小圆在左边`,
//! `上黄下蓝背景上，…` for a two-tone background.
//!
//! # Geometry (in fractions of the side, so any square size works)
//!
//! Position centres: left (¼, ½), right (¾, ½), top (½, ¼), bottom (½, ¾), centre (½, ½).
//! Radius: small 0.14, large 0.19 of the side (a square's half-side, a star's outer radius, a
//! triangle's circumradius). Training scenes jitter each centre by up to ±0.05 of the side.
//! Colors never repeat within a scene (shapes differ from each other and from the background
//! behind them), so each is measurable.

use std::fmt;

use tiny_skia::{Color, FillRule, Paint, PathBuilder, Pixmap, Rect, Transform};

use crate::noise::SplitMix64;

/// The named colors: English name, Chinese name, RGB. Saturated and far apart in RGB so the
/// nearest-palette-color rule of [`check_adherence`] separates them.
pub const COLORS: [(&str, &str, [u8; 3]); 8] = [
    ("red", "红", [220, 40, 40]),
    ("green", "绿", [40, 170, 60]),
    ("blue", "蓝", [40, 80, 220]),
    ("yellow", "黄", [240, 210, 40]),
    ("purple", "紫", [140, 60, 180]),
    ("orange", "橙", [245, 140, 30]),
    ("white", "白", [245, 245, 245]),
    ("black", "黑", [25, 25, 25]),
];

/// The shapes: English name, Chinese name.
pub const SHAPES: [(&str, &str); 5] = [
    ("circle", "圆"),
    ("square", "方块"),
    ("triangle", "三角形"),
    ("star", "星星"),
    ("ring", "圆环"),
];

/// Single-shape positions: English phrase, Chinese phrase, centre (x, y) in side fractions.
pub const POSITIONS: [(&str, &str, (f32, f32)); 5] = [
    ("on the left", "在左边", (0.25, 0.5)),
    ("on the right", "在右边", (0.75, 0.5)),
    ("at the top", "在顶部", (0.5, 0.25)),
    ("at the bottom", "在底部", (0.5, 0.75)),
    ("in the center", "在中间", (0.5, 0.5)),
];

/// Relations of the first shape to the second: English, Chinese (after `的`), the first
/// shape's position index and the second's.
pub const RELATIONS: [(&str, &str, usize, usize); 4] = [
    ("above", "上方", 2, 3),
    ("below", "下方", 3, 2),
    ("to the left of", "左边", 0, 1),
    ("to the right of", "右边", 1, 0),
];

/// Sizes: English, Chinese, radius as a fraction of the side.
pub const SIZES: [(&str, &str, f32); 2] = [("small", "小", 0.14), ("large", "大", 0.19)];

/// Largest centre jitter of training scenes, in side fractions: enough variety that the model
/// learns regions rather than exact pixels, small enough that shapes stay inside their region.
pub const JITTER: f32 = 0.05;

/// One shape: indices into [`SHAPES`], [`COLORS`], [`SIZES`] and [`POSITIONS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Object {
    /// Index into [`SHAPES`].
    pub shape: usize,
    /// Index into [`COLORS`].
    pub color: usize,
    /// Index into [`SIZES`].
    pub size: usize,
    /// Index into [`POSITIONS`] (for the second shape, implied by the relation).
    pub position: usize,
}

/// A scene: background (one color, or top and bottom colors), one or two shapes.
#[derive(Debug, Clone, PartialEq)]
pub struct Scene {
    /// Background color index (the top half's when `background2` is set).
    pub background: usize,
    /// The bottom half's color of a two-tone background.
    pub background2: Option<usize>,
    /// The first shape.
    pub first: Object,
    /// The relation index into [`RELATIONS`] and the second shape.
    pub second: Option<(usize, Object)>,
    /// Centre offsets (x, y) of the first and second shape, in side fractions.
    pub jitter: [(f32, f32); 2],
}

/// A caption's language.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    /// English.
    En,
    /// Chinese.
    Zh,
}

impl fmt::Display for Lang {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Lang::En => "en",
            Lang::Zh => "zh",
        })
    }
}

/// Whether a (color, shape, position) triple is held out of training: about one in six of the
/// 200 triples, chosen by hash so the set is fixed and spread over every color, shape and
/// position. Training scenes never contain a held-out triple (for either shape); the adherence
/// test draws its prompts from them.
pub fn is_held_out(color: usize, shape: usize, position: usize) -> bool {
    let h = blake3::hash(format!("held-out/{color}/{shape}/{position}").as_bytes());
    h.as_bytes()[0].is_multiple_of(6)
}

fn pick(rng: &mut SplitMix64, n: usize) -> usize {
    // n is tiny (≤ 8), so the modulo bias is below 2^-60.
    (rng.next_u64() % n as u64) as usize
}

fn jitter(rng: &mut SplitMix64) -> (f32, f32) {
    let j = |r: &mut SplitMix64| ((r.next_f64() * 2.0 - 1.0) as f32) * JITTER;
    (j(rng), j(rng))
}

impl Scene {
    /// A random training scene (no held-out triple), drawn from `rng`. About 40 % have two
    /// shapes and 15 % a two-tone background.
    pub fn random_train(rng: &mut SplitMix64) -> Self {
        loop {
            let s = Self::random_any(rng, true);
            if !s.has_held_out() {
                return s;
            }
        }
    }

    /// A random single-shape scene on a one-color background whose shape is a held-out triple,
    /// centred exactly (no jitter): the adherence test's prompts.
    pub fn random_held_out(rng: &mut SplitMix64) -> Self {
        loop {
            let mut s = Self::random_any(rng, false);
            s.second = None;
            s.background2 = None;
            s.jitter = [(0.0, 0.0); 2];
            if s.first.color != s.background
                && is_held_out(s.first.color, s.first.shape, s.first.position)
            {
                return s;
            }
        }
    }

    fn random_any(rng: &mut SplitMix64, allow_jitter: bool) -> Self {
        let background = pick(rng, COLORS.len());
        let background2 = if rng.next_f64() < 0.15 {
            Some(loop {
                let c = pick(rng, COLORS.len());
                if c != background {
                    break c;
                }
            })
        } else {
            None
        };
        let other_color = |rng: &mut SplitMix64, taken: &[usize]| loop {
            let c = pick(rng, COLORS.len());
            if !taken.contains(&c) {
                break c;
            }
        };
        let mut taken = vec![background];
        taken.extend(background2);
        let color = other_color(rng, &taken);
        taken.push(color);
        let mut first = Object {
            shape: pick(rng, SHAPES.len()),
            color,
            size: pick(rng, SIZES.len()),
            position: pick(rng, POSITIONS.len()),
        };
        let second = if rng.next_f64() < 0.4 {
            let rel = pick(rng, RELATIONS.len());
            first.position = RELATIONS[rel].2;
            let color = other_color(rng, &taken);
            Some((
                rel,
                Object {
                    shape: pick(rng, SHAPES.len()),
                    color,
                    size: pick(rng, SIZES.len()),
                    position: RELATIONS[rel].3,
                },
            ))
        } else {
            None
        };
        let jitter = if allow_jitter {
            [jitter(rng), jitter(rng)]
        } else {
            [(0.0, 0.0); 2]
        };
        Self {
            background,
            background2,
            first,
            second,
            jitter,
        }
    }

    /// The shapes in drawing order.
    pub fn objects(&self) -> Vec<Object> {
        let mut v = vec![self.first];
        v.extend(self.second.map(|(_, o)| o));
        v
    }

    /// Whether any shape of the scene is a held-out triple.
    pub fn has_held_out(&self) -> bool {
        self.objects()
            .iter()
            .any(|o| is_held_out(o.color, o.shape, o.position))
    }

    /// The caption in `lang`, following the grammar in the module doc.
    pub fn caption(&self, lang: Lang) -> String {
        match lang {
            Lang::En => self.caption_en(),
            Lang::Zh => self.caption_zh(),
        }
    }

    fn caption_en(&self) -> String {
        let obj = |o: &Object| {
            format!(
                "a {} {} {}",
                SIZES[o.size].0, COLORS[o.color].0, SHAPES[o.shape].0
            )
        };
        let bg = match self.background2 {
            None => format!("on a {} background", COLORS[self.background].0),
            Some(b2) => format!(
                "on a {} and {} background",
                COLORS[self.background].0, COLORS[b2].0
            ),
        };
        match &self.second {
            None => format!(
                "{} {} {bg}",
                obj(&self.first),
                POSITIONS[self.first.position].0
            ),
            Some((rel, o2)) => format!(
                "{} {} {} {bg}",
                obj(&self.first),
                RELATIONS[*rel].0,
                obj(o2)
            ),
        }
    }

    fn caption_zh(&self) -> String {
        let obj = |o: &Object| {
            format!(
                "一个{}色{}{}",
                COLORS[o.color].1, SIZES[o.size].1, SHAPES[o.shape].1
            )
        };
        let bg = match self.background2 {
            None => format!("{}色背景上", COLORS[self.background].1),
            Some(b2) => format!("上{}下{}背景上", COLORS[self.background].1, COLORS[b2].1),
        };
        match &self.second {
            None => format!(
                "{bg}，{}{}",
                obj(&self.first),
                POSITIONS[self.first.position].1
            ),
            Some((rel, o2)) => format!(
                "{bg}，{}在{}的{}",
                obj(&self.first),
                obj(o2),
                RELATIONS[*rel].1
            ),
        }
    }

    /// The centre of shape `k` (0 or 1) in pixels for a `side`-pixel square image.
    pub fn centre(&self, k: usize, side: u32) -> (f32, f32) {
        let o = if k == 0 {
            self.first
        } else {
            self.second.map_or(self.first, |(_, o)| o)
        };
        let (x, y) = POSITIONS[o.position].2;
        let (dx, dy) = self.jitter[k.min(1)];
        ((x + dx) * side as f32, (y + dy) * side as f32)
    }

    /// Draws the scene as a `side`×`side` image, row-major 8-bit RGB, anti-aliased.
    pub fn render(&self, side: u32) -> Vec<u8> {
        let Some(mut pixmap) = Pixmap::new(side, side) else {
            return Vec::new();
        };
        let rgb = |c: usize| {
            let [r, g, b] = COLORS[c].2;
            Color::from_rgba8(r, g, b, 255)
        };
        pixmap.fill(rgb(self.background));
        if let Some(b2) = self.background2 {
            let half = side as f32 / 2.0;
            if let Some(rect) = Rect::from_xywh(0.0, half, side as f32, half) {
                let mut paint = Paint::default();
                paint.set_color(rgb(b2));
                pixmap.fill_rect(rect, &paint, Transform::identity(), None);
            }
        }
        for (k, o) in self.objects().iter().enumerate() {
            let (cx, cy) = self.centre(k, side);
            let r = SIZES[o.size].2 * side as f32;
            let mut paint = Paint::default();
            paint.set_color(rgb(o.color));
            paint.anti_alias = true;
            let mut pb = PathBuilder::new();
            let mut rule = FillRule::Winding;
            match SHAPES[o.shape].0 {
                "circle" => pb.push_circle(cx, cy, r),
                "square" => {
                    if let Some(rect) = Rect::from_xywh(cx - r, cy - r, 2.0 * r, 2.0 * r) {
                        pb.push_rect(rect);
                    }
                }
                "triangle" => polygon(&mut pb, cx, cy, r, 3, None),
                "star" => polygon(&mut pb, cx, cy, r, 5, Some(0.45)),
                _ => {
                    // ring: a disc with a hole of 35 % of its radius (the hole stays smaller
                    // than the measuring disc of `check_adherence`).
                    pb.push_circle(cx, cy, r);
                    pb.push_circle(cx, cy, 0.35 * r);
                    rule = FillRule::EvenOdd;
                }
            }
            if let Some(path) = pb.finish() {
                pixmap.fill_path(&path, &paint, rule, Transform::identity(), None);
            }
        }
        // Every pixel is opaque, so the premultiplied RGBA bytes are the straight colors.
        pixmap
            .data()
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect()
    }
}

/// A regular polygon (`inner = None`) or star (`inner` = inner radius over outer) with `n`
/// points, pointing up, centred at (cx, cy) with outer radius `r`.
fn polygon(pb: &mut PathBuilder, cx: f32, cy: f32, r: f32, n: usize, inner: Option<f32>) {
    let verts = if inner.is_some() { 2 * n } else { n };
    for i in 0..verts {
        let rad = match inner {
            Some(k) if i % 2 == 1 => r * k,
            _ => r,
        };
        let a = -std::f32::consts::FRAC_PI_2 + (i as f32) * std::f32::consts::TAU / verts as f32;
        let (x, y) = (cx + rad * a.cos(), cy + rad * a.sin());
        if i == 0 {
            pb.move_to(x, y);
        } else {
            pb.line_to(x, y);
        }
    }
    pb.close();
}

/// The index of the palette color nearest to `rgb` (squared RGB distance).
pub fn nearest_color(rgb: [u8; 3]) -> usize {
    let d = |c: [u8; 3]| -> i32 {
        (0..3)
            .map(|i| (i32::from(rgb[i]) - i32::from(c[i])).pow(2))
            .sum()
    };
    (0..COLORS.len())
        .min_by_key(|&i| d(COLORS[i].2))
        .unwrap_or(0)
}

/// What [`check_adherence`] found.
#[derive(Debug, Clone, PartialEq)]
pub struct Adherence {
    /// Every corner patch's dominant color was the background named for its half.
    pub background_ok: bool,
    /// Per shape: the fraction of pixels in its measuring disc nearest to its named color.
    pub shape_fractions: Vec<f32>,
}

/// Fraction of a shape's measuring disc that must show its color. Drawn exactly, every shape
/// covers about half of the disc or more (a small star ≈ 49 %, a large ring ≈ 62 %), while a
/// large shape one position away (centre vs side, the closest pair) reaches ≈ 17 % of it.
pub const SHAPE_FRACTION: f32 = 0.3;

impl Adherence {
    /// Background right and every shape's color at its place.
    pub fn ok(&self) -> bool {
        self.background_ok && self.shapes_ok()
    }

    /// Every shape's color at its place, whatever the background.
    pub fn shapes_ok(&self) -> bool {
        self.shape_fractions.iter().all(|&f| f >= SHAPE_FRACTION)
    }
}

/// Measures from the pixels whether `rgb` (`side`×`side`, row-major RGB) shows `scene`:
/// - **background**: in each of the four corner squares (side/8 on a side, clear of every shape
///   by the geometry above) the most common nearest-palette color is the background named for
///   that half;
/// - **shapes**: in the disc of radius 7/64 of the side around each shape's named centre, at least
///   [`SHAPE_FRACTION`] of the pixels are nearest to the shape's color.
pub fn check_adherence(scene: &Scene, rgb: &[u8], side: u32) -> Adherence {
    let s = side as usize;
    let px = |x: usize, y: usize| -> [u8; 3] {
        let i = 3 * (y * s + x);
        [rgb[i], rgb[i + 1], rgb[i + 2]]
    };
    let corner = (s / 8).max(1);
    let mut background_ok = rgb.len() == 3 * s * s;
    if background_ok {
        for (cx, cy) in [
            (0, 0),
            (s - corner, 0),
            (0, s - corner),
            (s - corner, s - corner),
        ] {
            let mut counts = [0usize; COLORS.len()];
            for y in cy..cy + corner {
                for x in cx..cx + corner {
                    counts[nearest_color(px(x, y))] += 1;
                }
            }
            let dominant = (0..COLORS.len()).max_by_key(|&i| counts[i]).unwrap_or(0);
            let want = match scene.background2 {
                Some(b2) if cy > 0 => b2,
                _ => scene.background,
            };
            background_ok &= dominant == want;
        }
    }
    let shape_fractions = scene
        .objects()
        .iter()
        .enumerate()
        .map(|(k, o)| {
            if rgb.len() != 3 * s * s {
                return 0.0;
            }
            let (cx, cy) = scene.centre(k, side);
            let r = side as f32 * 7.0 / 64.0;
            let (mut hit, mut all) = (0usize, 0usize);
            for y in 0..s {
                for x in 0..s {
                    let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
                    if dx * dx + dy * dy <= r * r {
                        all += 1;
                        hit += usize::from(nearest_color(px(x, y)) == o.color);
                    }
                }
            }
            hit as f32 / all.max(1) as f32
        })
        .collect();
    Adherence {
        background_ok,
        shape_fractions,
    }
}

/// `n` held-out test scenes, the same for every run (seeded by `seed`).
pub fn held_out_set(seed: u64, n: usize) -> Vec<Scene> {
    let mut rng = SplitMix64::new(seed);
    (0..n).map(|_| Scene::random_held_out(&mut rng)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captions_follow_the_grammar() {
        let s = Scene {
            background: 3,
            background2: None,
            first: Object {
                shape: 0,
                color: 0,
                size: 0,
                position: 2,
            },
            second: Some((
                0,
                Object {
                    shape: 1,
                    color: 2,
                    size: 1,
                    position: 3,
                },
            )),
            jitter: [(0.0, 0.0); 2],
        };
        assert_eq!(
            s.caption(Lang::En),
            "a small red circle above a large blue square on a yellow background"
        );
        assert_eq!(
            s.caption(Lang::Zh),
            "黄色背景上，一个红色小圆在一个蓝色大方块的上方"
        );
    }

    #[test]
    fn drawn_scenes_pass_their_own_measure() {
        let mut rng = SplitMix64::new(7);
        for _ in 0..200 {
            let s = Scene::random_train(&mut rng);
            let img = s.render(64);
            let a = check_adherence(&s, &img, 64);
            assert!(a.ok(), "{} → {a:?}", s.caption(Lang::En));
        }
        for s in held_out_set(1, 50) {
            assert!(s.has_held_out());
            assert!(check_adherence(&s, &s.render(64), 64).ok());
        }
    }

    #[test]
    fn a_wrong_picture_fails_the_measure() {
        let mut rng = SplitMix64::new(3);
        let s = Scene::random_held_out(&mut rng);
        let mut moved = s.clone();
        // The opposite side (the centre moves to the left).
        moved.first.position = [1, 0, 3, 2, 0][s.first.position];
        assert!(!check_adherence(&s, &moved.render(64), 64).ok());
        let mut recolored = s.clone();
        recolored.background = (0..COLORS.len())
            .find(|&c| c != s.background && c != s.first.color)
            .unwrap();
        assert!(!check_adherence(&s, &recolored.render(64), 64).ok());
    }

    #[test]
    fn some_triples_are_held_out_in_every_color() {
        let held: Vec<_> = (0..8)
            .flat_map(|c| (0..5).flat_map(move |s| (0..5).map(move |p| (c, s, p))))
            .filter(|&(c, s, p)| is_held_out(c, s, p))
            .collect();
        assert!(held.len() > 20 && held.len() < 60, "{}", held.len());
        for c in 0..8 {
            assert!(held.iter().any(|t| t.0 == c), "color {c}");
        }
    }
}
