//! How a [`Frame`] is drawn: one block of lines per VIP, a row per backend with its share of new
//! flows and its share of the weights as bars side by side, in 100 columns (a draining backend's
//! pinned flows on a line of their own). The same lines go to the terminal (`lb top`) and,
//! through a buffer in memory, to stdout as plain text (`lb top --once`).

use ratatui::{
    Terminal,
    backend::TestBackend,
    buffer::Buffer,
    layout::Rect,
    style::{Color, Modifier, Style},
    text::{Line, Span},
    widgets::{Paragraph, Widget},
};

use super::model::{BackendRow, Frame, VipRow};

/// Cells of a share bar (each cell is 10 %).
pub const BAR_CELLS: usize = 10;
const FULL: char = '█';
const EMPTY: char = '░';

/// A bar `BAR_CELLS` wide, filled to `share` (0..=1), rounded to the nearest cell.
pub fn bar(share: Option<f64>) -> String {
    let filled = share.map_or(0, |s| {
        (s.clamp(0.0, 1.0) * BAR_CELLS as f64).round() as usize
    });
    let mut s = String::with_capacity(BAR_CELLS * 3);
    s.extend(std::iter::repeat_n(FULL, filled));
    s.extend(std::iter::repeat_n(EMPTY, BAR_CELLS - filled));
    s
}

fn percent(share: Option<f64>) -> String {
    share.map_or_else(|| "-".to_string(), |s| format!("{:.1}%", s * 100.0))
}

fn rate(r: f64) -> String {
    if r >= 100.0 {
        format!("{r:.0}")
    } else {
        format!("{r:.1}")
    }
}

/// The lines of one screen. `hint` ends the title line (the keys, in the live view).
pub fn lines(f: &Frame, hint: &str) -> Vec<Line<'static>> {
    let mut out = vec![Line::from(vec![
        Span::styled("lb top", Style::new().add_modifier(Modifier::BOLD)),
        Span::raw(format!(
            "  rates over {:.1}s, shares of new flows over {:.0}s  drops {}/s (all VIPs)  {hint}",
            f.interval.as_secs_f64(),
            f.since_start.as_secs_f64(),
            rate(f.drops_per_s),
        )),
    ])];
    if f.half_open_per_s > 0.0 {
        out.push(Line::styled(
            format!(
                "NAT: {} half-open translations/s freed (a SYN flood?)",
                rate(f.half_open_per_s)
            ),
            Style::new().add_modifier(Modifier::BOLD),
        ));
    }
    if f.vips.is_empty() {
        out.push(Line::raw("no VIPs"));
    }
    for v in &f.vips {
        out.push(Line::raw(""));
        out.extend(vip_lines(v));
    }
    out
}

fn vip_lines(v: &VipRow) -> Vec<Line<'static>> {
    let name = v
        .name
        .as_ref()
        .map(|n| format!(" ({n})"))
        .unwrap_or_default();
    let mut out = vec![
        Line::from(vec![
            Span::styled(
                format!("{}{name}", v.label),
                Style::new().add_modifier(Modifier::BOLD),
            ),
            Span::raw(format!(
                "  {} pkt/s  {} new/s{}  {} no backend/s",
                rate(v.packets_per_s),
                rate(v.new_flows_per_s),
                v.replies_per_s
                    .map(|r| format!("  {} replies/s", rate(r)))
                    .unwrap_or_default(),
                rate(v.drops_per_s),
            )),
            // A flood at a VIP with a new-flow budget: the refused new flows, in red.
            Span::styled(
                if v.over_budget_per_s > 0.0 {
                    format!("  {} over budget/s", rate(v.over_budget_per_s))
                } else {
                    String::new()
                },
                Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
            ),
        ]),
        Line::styled(
            format!(
                "  {:<24} {:<11} {:>6} {:<17} {:<17} {:>6} {:>9}",
                "BACKEND", "HEALTH", "WEIGHT", "NEW FLOWS", "WEIGHT SHARE", "NOW", "FLOWS/s",
            ),
            Style::new().add_modifier(Modifier::DIM),
        ),
    ];
    for b in &v.backends {
        out.push(backend_line(b));
        out.extend(drain_line(b));
    }
    if v.backends.iter().any(|b| b.overridden) {
        out.push(Line::styled(
            "  * weight set by lb drain or lb weight (lb status lists them; lb undrain undoes)",
            Style::new().add_modifier(Modifier::DIM),
        ));
    }
    out
}

/// Under a draining backend: the flows still pinned to it.
fn drain_line(b: &BackendRow) -> Option<Line<'static>> {
    let text = match (b.draining, b.pinned_flows) {
        (false, _) => return None,
        (true, Some(n)) => format!(
            "    draining: {} flows pinned, {} in use (used in the last {}s)",
            n.total,
            n.in_use,
            super::sample::IDLE.as_secs()
        ),
        (true, None) => "    draining".to_string(),
    };
    Some(Line::styled(text, Style::new().fg(Color::Yellow)))
}

fn backend_line(b: &BackendRow) -> Line<'static> {
    let health = match b.health {
        super::sample::Health::Healthy | super::sample::Health::Unchecked => Style::new(),
        super::sample::Health::Unknown => Style::new().add_modifier(Modifier::DIM),
        _ => Style::new().fg(Color::Red),
    };
    let weight = match (b.weight, b.overridden) {
        (None, _) => "-".to_string(),
        (Some(w), false) => w.to_string(),
        (Some(w), true) => format!("{w}*"),
    };
    Line::from(vec![
        Span::raw(format!("  {:<24} ", b.label)),
        Span::styled(format!("{:<11}", b.health.label()), health),
        Span::raw(format!(" {weight:>6} ")),
        Span::styled(bar(b.share_since_start), Style::new().fg(Color::Cyan)),
        Span::raw(format!(" {:>6} ", percent(b.share_since_start))),
        Span::styled(bar(b.weight_share), Style::new().fg(Color::Green)),
        Span::raw(format!(
            " {:>6} {:>6} {:>9}",
            percent(b.weight_share),
            percent(b.share_now),
            rate(b.new_flows_per_s)
        )),
    ])
}

/// Draws `lines`, scrolled down by `scroll` lines, into `area` of `buf`.
pub fn draw(lines: Vec<Line<'static>>, scroll: u16, area: Rect, buf: &mut Buffer) {
    Paragraph::new(lines).scroll((scroll, 0)).render(area, buf);
}

/// The screen as plain text, one line each, trailing blanks trimmed: drawn by the same widget
/// into a buffer as wide as the widest line.
pub fn to_text(f: &Frame) -> String {
    let lines = lines(f, "");
    let width = lines.iter().map(Line::width).max().unwrap_or(1).max(1) as u16;
    let height = lines.len().max(1) as u16;
    let mut term = Terminal::new(TestBackend::new(width, height)).expect("a buffer in memory");
    term.draw(|fr| draw(lines, 0, fr.area(), fr.buffer_mut()))
        .expect("drawing into memory");
    let buf = term.backend().buffer();
    let mut out = String::new();
    for y in 0..height {
        let row: String = (0..width)
            .map(|x| buf.cell((x, y)).map_or(" ", |c| c.symbol()))
            .collect();
        out.push_str(row.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::top::model::{build, tests::three_readings};

    #[test]
    fn a_bar_fills_one_cell_per_ten_percent() {
        assert_eq!(
            bar(Some(0.5)),
            format!("{}{}", "█".repeat(5), "░".repeat(5))
        );
        assert_eq!(
            bar(Some(0.26)),
            format!("{}{}", "█".repeat(3), "░".repeat(7))
        );
        assert_eq!(bar(None), "░".repeat(10));
        assert_eq!(bar(Some(1.0)), "█".repeat(10));
    }

    #[test]
    fn the_text_screen_shows_each_backend_with_both_bars_its_health_and_pinned_flows() {
        let (first, prev, cur) = three_readings();
        let text = to_text(&build(&first, &prev, &cur));
        let line = |label: &str| {
            text.lines()
                .find(|l| l.trim_start().starts_with(label))
                .unwrap_or_else(|| panic!("no line for {label}:\n{text}"))
                .to_string()
        };
        assert!(
            text.lines()
                .any(|l| l.starts_with("192.0.2.10:80/tcp (web)")
                    && l.contains("50.0 pkt/s")
                    && l.contains("10.0 new/s")
                    && l.contains("15.0 replies/s")
                    && l.contains("5.0 no backend/s")
                    && l.contains("5.0 over budget/s")),
            "{text}"
        );
        // The readings free 20 half-open translations in 2 s: the line under the title says so.
        assert!(
            text.lines()
                .nth(1)
                .is_some_and(|l| l.starts_with("NAT: 10.0 half-open translations/s freed")),
            "{text}"
        );
        // 32/60 = 53.3 % (5 cells), weights 200/300 = 66.7 % (7 cells).
        let b1 = line("10.1.0.1:80");
        assert!(
            b1.contains(&format!("{}  53.3%", bar(Some(32.0 / 60.0)))),
            "{b1}"
        );
        assert!(
            b1.contains(&format!("{}  66.7%", bar(Some(2.0 / 3.0)))),
            "{b1}"
        );
        assert_eq!(b1.matches('█').count(), 5 + 7, "{b1}");
        assert!(b1.contains("healthy") && b1.contains("200"), "{b1}");
        let b3 = line("10.1.0.3:80");
        assert!(b3.contains("unhealthy"), "{b3}");
        assert!(b3.contains(&format!("{}   0.0%", bar(Some(0.0)))), "{b3}");
        // Its pinned flows on the line under it.
        let under = text
            .lines()
            .skip_while(|l| !l.contains("10.1.0.3:80"))
            .nth(1);
        assert_eq!(
            under.map(str::trim),
            Some("draining: 7 flows pinned, 2 in use (used in the last 10s)"),
            "{text}"
        );
        let widest = text.lines().map(|l| l.chars().count()).max();
        assert!(widest <= Some(100), "wider than 100 columns:\n{text}");
    }
}
