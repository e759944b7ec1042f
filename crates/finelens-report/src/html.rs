//! One self-contained HTML page: images embedded as data URIs, styles and the small sorting script
//! inline, no network request, no external font. Every string that comes from data (class names,
//! file names, paths) goes through [`escape`]; the page is built from typed blocks, so no caller
//! writes markup.

use std::fmt::Write;

/// Text for HTML element content and attribute values: `& < > " '` as entities.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Standard base64 (RFC 4648) for data URIs.
pub fn base64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A verdict shown as a coloured badge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Pass,
    Fail,
    /// Not measured, or informational.
    Neutral,
}

/// One table cell: text, or a badge.
#[derive(Debug, Clone)]
pub enum Cell {
    Text(String),
    /// A number, right-aligned, and sorted as a number.
    Number(f64, usize),
    Badge(String, Status),
}

/// One picture in a gallery card.
#[derive(Debug, Clone)]
pub struct Figure {
    pub caption: String,
    pub png: Vec<u8>,
}

/// A gallery card: an image's pictures (or a text's coloured tokens), a caption, and the keys
/// it can be sorted by.
#[derive(Debug, Clone)]
pub struct Card {
    pub title: String,
    pub caption: String,
    pub figures: Vec<Figure>,
    /// A text card's tokens (empty for an image's card).
    pub tokens: Vec<Span>,
    /// The predicted class's probability.
    pub confidence: f64,
    /// Misclassified (sorted first by "errors first").
    pub error: bool,
}

#[derive(Debug, Clone)]
pub enum Block {
    Heading(u8, String),
    Paragraph(String),
    Badges(Vec<(String, Status)>),
    /// Header row, then rows; a table of labelled facts is `["", ""]`-headed.
    Table(Vec<String>, Vec<Vec<Cell>>),
    Image {
        png: Vec<u8>,
        alt: String,
    },
    Gallery(Vec<Card>),
    /// Text coloured token by token (an attribution over tokens): each span's background, and
    /// its score in a tooltip so that the page reads without colour too.
    Tokens(Vec<Span>),
}

/// One coloured piece of text.
#[derive(Debug, Clone)]
pub struct Span {
    pub text: String,
    pub colour: [u8; 3],
    /// Shown on hover (the token and its score).
    pub title: String,
}

/// A page: a title and blocks in order.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub title: String,
    pub blocks: Vec<Block>,
}

const STYLE: &str = "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2rem auto;max-width:1100px;padding:0 1rem;color:#1b1b1b;line-height:1.45}\
h1{font-size:1.7rem}h2{margin-top:2.2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}\
table{border-collapse:collapse;margin:.6rem 0}td,th{border:1px solid #ddd;padding:.25rem .55rem;vertical-align:top;overflow-wrap:anywhere}\
th{background:#f4f4f4;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}\
.badge{display:inline-block;border-radius:.8rem;padding:.1rem .7rem;margin:.1rem .3rem .1rem 0;font-weight:600;font-size:.9rem}\
.pass{background:#d7f0dd;color:#0b5d1e}.fail{background:#fbd9d6;color:#8a1c10}.neutral{background:#eee;color:#444}\
img{image-rendering:pixelated;max-width:100%}\
.gallery{display:flex;flex-wrap:wrap;gap:.8rem}.card{border:1px solid #ddd;border-radius:.4rem;padding:.5rem;max-width:100%}\
.card .figs{display:flex;flex-wrap:wrap;gap:.3rem}.card figure{margin:0;text-align:center;font-size:.75rem}.card img{width:96px}\
.card.error{border-color:#c0392b}.tokens span{padding:.05rem .15rem;border-radius:.2rem;line-height:1.9}.sort button{margin-right:.4rem}";

/// Sorts the gallery cards by their data attributes; no dependency, no network.
const SCRIPT: &str = "function sortCards(g,key){var box=document.getElementById(g);var cards=Array.prototype.slice.call(box.children);\
cards.sort(function(a,b){if(key==='error'){var d=Number(b.dataset.error)-Number(a.dataset.error);if(d!==0)return d;}\
return Number(a.dataset.confidence)-Number(b.dataset.confidence);});\
if(key==='confidence-desc')cards.reverse();cards.forEach(function(c){box.appendChild(c);});}";

fn status_class(s: Status) -> &'static str {
    match s {
        Status::Pass => "pass",
        Status::Fail => "fail",
        Status::Neutral => "neutral",
    }
}

fn img(png: &[u8], alt: &str) -> String {
    format!(
        "<img alt=\"{}\" src=\"data:image/png;base64,{}\">",
        escape(alt),
        base64(png)
    )
}

/// Coloured spans as one paragraph.
fn tokens(h: &mut String, spans: &[Span]) {
    h.push_str("<p class=\"tokens\">");
    for sp in spans {
        let [r, g, b] = sp.colour;
        // Dark backgrounds get light text (relative luminance, ITU-R BT.709).
        let luminance = 0.2126 * r as f32 + 0.7152 * g as f32 + 0.0722 * b as f32;
        let dark = luminance < 110.0;
        let _ = write!(
            h,
            "<span style=\"background:#{r:02x}{g:02x}{b:02x}{}\" title=\"{}\">{}</span> ",
            if dark { ";color:#fff" } else { "" },
            escape(&sp.title),
            escape(&sp.text)
        );
    }
    h.push_str("</p>");
}

/// The page as one HTML document.
pub fn render(page: &Page) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
<title>{}</title><style>{STYLE}</style><script>{SCRIPT}</script></head><body>\n<h1>{}</h1>\n",
        escape(&page.title),
        escape(&page.title)
    );
    let mut galleries = 0;
    for b in &page.blocks {
        match b {
            Block::Heading(level, t) => {
                let l = (*level).clamp(2, 4);
                let _ = writeln!(h, "<h{l}>{}</h{l}>", escape(t));
            }
            Block::Paragraph(t) => {
                let _ = writeln!(h, "<p>{}</p>", escape(t));
            }
            Block::Tokens(spans) => {
                tokens(&mut h, spans);
                h.push('\n');
            }
            Block::Badges(items) => {
                h.push_str("<p>");
                for (t, s) in items {
                    let _ = write!(
                        h,
                        "<span class=\"badge {}\">{}</span>",
                        status_class(*s),
                        escape(t)
                    );
                }
                h.push_str("</p>\n");
            }
            Block::Table(head, rows) => {
                h.push_str("<table>");
                if head.iter().any(|c| !c.is_empty()) {
                    h.push_str("<tr>");
                    for c in head {
                        let _ = write!(h, "<th>{}</th>", escape(c));
                    }
                    h.push_str("</tr>");
                }
                for row in rows {
                    h.push_str("<tr>");
                    for c in row {
                        match c {
                            Cell::Text(t) => {
                                let _ = write!(h, "<td>{}</td>", escape(t));
                            }
                            Cell::Number(v, digits) => {
                                let t = if v.is_finite() {
                                    format!("{v:.digits$}")
                                } else {
                                    "—".into()
                                };
                                let _ = write!(h, "<td class=\"num\">{t}</td>");
                            }
                            Cell::Badge(t, s) => {
                                let _ = write!(
                                    h,
                                    "<td><span class=\"badge {}\">{}</span></td>",
                                    status_class(*s),
                                    escape(t)
                                );
                            }
                        }
                    }
                    h.push_str("</tr>");
                }
                h.push_str("</table>\n");
            }
            Block::Image { png, alt } => {
                let _ = writeln!(h, "<p>{}</p>", img(png, alt));
            }
            Block::Gallery(cards) => {
                galleries += 1;
                let id = format!("gallery{galleries}");
                let _ = writeln!(
                    h,
                    "<p class=\"sort\">Sort: <button onclick=\"sortCards('{id}','confidence')\">least confident first</button>\
<button onclick=\"sortCards('{id}','confidence-desc')\">most confident first</button>\
<button onclick=\"sortCards('{id}','error')\">errors first</button></p><div class=\"gallery\" id=\"{id}\">"
                );
                for c in cards {
                    let _ = write!(
                        h,
                        "<div class=\"card{}\" data-confidence=\"{}\" data-error=\"{}\"><strong>{}</strong><div class=\"figs\">",
                        if c.error { " error" } else { "" },
                        c.confidence,
                        c.error as u8,
                        escape(&c.title)
                    );
                    if !c.tokens.is_empty() {
                        tokens(&mut h, &c.tokens);
                    }
                    for f in &c.figures {
                        let _ = write!(
                            h,
                            "<figure>{}<figcaption>{}</figcaption></figure>",
                            img(&f.png, &f.caption),
                            escape(&f.caption)
                        );
                    }
                    let _ = write!(h, "</div><div>{}</div></div>", escape(&c.caption));
                }
                h.push_str("</div>\n");
            }
        }
    }
    h.push_str("</body></html>\n");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc_4648() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), want);
        }
    }

    /// A class or file named like markup renders as text: no element, no attribute breaks out.
    #[test]
    fn data_is_escaped_everywhere() {
        let evil = "<script>alert(1)</script>\"'&";
        let page = Page {
            title: evil.into(),
            blocks: vec![
                Block::Heading(2, evil.into()),
                Block::Paragraph(evil.into()),
                Block::Tokens(vec![Span {
                    text: evil.into(),
                    colour: [0, 0, 0],
                    title: evil.into(),
                }]),
                Block::Badges(vec![(evil.into(), Status::Fail)]),
                Block::Table(
                    vec![evil.into()],
                    vec![vec![
                        Cell::Text(evil.into()),
                        Cell::Badge(evil.into(), Status::Pass),
                    ]],
                ),
                Block::Image {
                    png: vec![1, 2, 3],
                    alt: evil.into(),
                },
                Block::Gallery(vec![Card {
                    title: evil.into(),
                    caption: evil.into(),
                    figures: vec![Figure {
                        caption: evil.into(),
                        png: vec![0],
                    }],
                    tokens: vec![Span {
                        text: evil.into(),
                        colour: [255, 255, 255],
                        title: evil.into(),
                    }],
                    confidence: 0.5,
                    error: true,
                }]),
            ],
        };
        let html = render(&page);
        assert!(!html.contains("<script>alert"), "{html}");
        assert!(!html.contains("\"'&<"));
        assert_eq!(
            html.matches("<script>").count(),
            1,
            "only the page's own script"
        );
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#39;&amp;"));
        // Self-contained: no URL that would make the browser fetch anything.
        for needle in ["http://", "https://", "src=\"/", "url("] {
            assert!(!html.contains(needle), "{needle}");
        }
        assert!(html.contains("data:image/png;base64,AQID"));
    }
}
