//! The live view: the alternate screen, redrawn every interval and on resize, scrolled with the
//! arrow keys, left with q, Esc or Ctrl-C. The terminal is restored however the view ends
//! (ratatui's panic hook restores it on a panic).

use std::{
    io::IsTerminal as _,
    path::Path,
    time::{Duration, Instant},
};

use ratatui::{
    DefaultTerminal,
    crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers},
    text::Line,
};

use super::{TopError, model, read, sample::Sample, ui};
use crate::kernel::inspect::Pinned;

const HINT: &str = "q quits, arrows scroll";

/// What a key asks for.
#[derive(Debug, PartialEq, Eq)]
enum Key {
    Quit,
    Scroll(i32),
    Other,
}

fn key(k: KeyEvent) -> Key {
    if k.kind != KeyEventKind::Press {
        return Key::Other;
    }
    match k.code {
        KeyCode::Char('q') | KeyCode::Esc => Key::Quit,
        KeyCode::Char('c') if k.modifiers.contains(KeyModifiers::CONTROL) => Key::Quit,
        KeyCode::Up | KeyCode::Char('k') => Key::Scroll(-1),
        KeyCode::Down | KeyCode::Char('j') => Key::Scroll(1),
        KeyCode::PageUp => Key::Scroll(-10),
        KeyCode::PageDown => Key::Scroll(10),
        KeyCode::Home => Key::Scroll(i32::MIN / 2),
        _ => Key::Other,
    }
}

/// `lb top`: runs until a quit key.
pub fn live(p: &Pinned, state_dir: &Path, interval: Duration) -> Result<(), TopError> {
    if !std::io::stdout().is_terminal() {
        return Err(TopError::NotATerminal);
    }
    let first = read(p, state_dir)?;
    let mut term = ratatui::try_init().map_err(TopError::Terminal)?;
    let result = run(&mut term, p, state_dir, interval, first);
    ratatui::restore();
    result
}

fn run(
    term: &mut DefaultTerminal,
    p: &Pinned,
    state_dir: &Path,
    interval: Duration,
    first: Sample,
) -> Result<(), TopError> {
    let mut prev = first.clone();
    let mut lines = vec![Line::raw(format!(
        "lb top: first figures in {:.1}s  {HINT}",
        interval.as_secs_f64()
    ))];
    let mut scroll: i32 = 0;
    let mut next = Instant::now() + interval;
    loop {
        let max = lines.len().saturating_sub(1) as i32;
        scroll = scroll.clamp(0, max);
        term.draw(|f| ui::draw(lines.clone(), scroll as u16, f.area(), f.buffer_mut()))
            .map_err(TopError::Terminal)?;
        // Keys until the next reading is due.
        while let Some(wait) = next.checked_duration_since(Instant::now()) {
            if !event::poll(wait).map_err(TopError::Terminal)? {
                break;
            }
            match event::read().map_err(TopError::Terminal)? {
                Event::Key(k) => match key(k) {
                    Key::Quit => return Ok(()),
                    Key::Scroll(by) => {
                        scroll = (scroll + by).clamp(0, max);
                        break;
                    }
                    Key::Other => {}
                },
                Event::Resize(..) => break,
                _ => {}
            }
        }
        if Instant::now() >= next {
            let cur = read(p, state_dir)?;
            lines = ui::lines(&model::build(&first, &prev, &cur), HINT);
            prev = cur;
            next += interval;
            // After a stall (a suspended terminal), the next reading is an interval from now.
            if next < Instant::now() {
                next = Instant::now() + interval;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn press(code: KeyCode, modifiers: KeyModifiers) -> Key {
        key(KeyEvent::new(code, modifiers))
    }

    #[test]
    fn q_esc_and_ctrl_c_quit_and_the_arrows_scroll() {
        assert_eq!(press(KeyCode::Char('q'), KeyModifiers::NONE), Key::Quit);
        assert_eq!(press(KeyCode::Esc, KeyModifiers::NONE), Key::Quit);
        assert_eq!(press(KeyCode::Char('c'), KeyModifiers::CONTROL), Key::Quit);
        assert_eq!(press(KeyCode::Char('c'), KeyModifiers::NONE), Key::Other);
        assert_eq!(press(KeyCode::Down, KeyModifiers::NONE), Key::Scroll(1));
        assert_eq!(press(KeyCode::Up, KeyModifiers::NONE), Key::Scroll(-1));
        let mut release = KeyEvent::new(KeyCode::Char('q'), KeyModifiers::NONE);
        release.kind = KeyEventKind::Release;
        assert_eq!(key(release), Key::Other);
    }
}
