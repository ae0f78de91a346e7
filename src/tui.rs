//! The chat's terminal UI: a messages pane, a member list, a status line and an input line that
//! incoming messages never break. Used only on a real terminal; pipes keep the line mode.
//!
//! [`ChatView`] is plain state (what to show, what was typed) and [`render`] draws it, so both
//! are tested without a terminal; [`Screen`] is the thin part that owns the terminal (raw mode,
//! alternate screen) and always gives it back, on every way out.

use ratatui::crossterm::event::{Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Direction, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, List, ListItem, Paragraph, Wrap};
use ratatui::Frame;
use std::collections::VecDeque;

/// Lines the messages pane keeps; older ones scroll away (the island keeps its own history).
pub const MAX_VIEW_LINES: usize = 2_000;
/// The longest line the input accepts, in characters: a chat line, not a document.
pub const MAX_INPUT_CHARS: usize = 2_000;

/// One line of the messages pane.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ViewLine {
    /// A chat message.
    Chat {
        /// Its seq.
        seq: u64,
        /// Who said it.
        name: String,
        /// What was said.
        text: String,
    },
    /// Something the program says (joins, reconnects, warnings).
    Note(String),
}

/// What the status line shows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    /// The last seq applied.
    pub seq: u64,
    /// Router time of the last message or tick, in microseconds.
    pub time_us: u64,
    /// The island's digest (a prefix is shown).
    pub digest: String,
    /// "connected to ADDR", "reconnecting ...".
    pub connection: String,
}

/// What the user asked for with a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send this line.
    Send(String),
    /// Leave the island.
    Quit,
}

/// Everything on screen.
#[derive(Clone, Debug, Default)]
pub struct ChatView {
    /// The island's name, in the title.
    pub island: String,
    lines: VecDeque<ViewLine>,
    members: Vec<String>,
    /// The status line.
    pub status: Status,
    input: String,
}

impl ChatView {
    /// An empty view of `island`.
    pub fn new(island: impl Into<String>) -> ChatView {
        ChatView {
            island: island.into(),
            ..ChatView::default()
        }
    }

    /// Adds a chat line.
    pub fn push_chat(&mut self, seq: u64, name: &str, text: &str) {
        self.push(ViewLine::Chat {
            seq,
            name: name.to_string(),
            text: text.to_string(),
        });
    }

    /// Adds a note from the program.
    pub fn push_note(&mut self, note: impl Into<String>) {
        self.push(ViewLine::Note(note.into()));
    }

    fn push(&mut self, line: ViewLine) {
        if self.lines.len() == MAX_VIEW_LINES {
            self.lines.pop_front();
        }
        self.lines.push_back(line);
    }

    /// Forgets every chat line (the island was restored from a snapshot or started fresh).
    pub fn clear_chat(&mut self) {
        self.lines.retain(|l| matches!(l, ViewLine::Note(_)));
    }

    /// Replaces the member list.
    pub fn set_members(&mut self, members: Vec<String>) {
        self.members = members;
    }

    /// The lines shown, oldest first.
    #[cfg(test)]
    pub fn lines(&self) -> impl Iterator<Item = &ViewLine> {
        self.lines.iter()
    }

    /// What is typed so far.
    #[cfg(test)]
    pub fn input(&self) -> &str {
        &self.input
    }

    /// Applies one terminal event: typing edits the input line; Enter sends it; Ctrl-C, and
    /// Ctrl-D or Esc on an empty line, leave.
    pub fn handle_event(&mut self, event: &Event) -> Option<Action> {
        match event {
            Event::Key(key) if key.kind != KeyEventKind::Release => self.handle_key(key),
            Event::Paste(text) => {
                for c in text.chars().filter(|c| !c.is_control()) {
                    self.type_char(c);
                }
                None
            }
            _ => None,
        }
    }

    fn handle_key(&mut self, key: &KeyEvent) -> Option<Action> {
        let ctrl = key.modifiers.contains(KeyModifiers::CONTROL);
        match key.code {
            KeyCode::Char('c') if ctrl => Some(Action::Quit),
            KeyCode::Char('d') if ctrl => self.input.is_empty().then_some(Action::Quit),
            KeyCode::Char('u') if ctrl => {
                self.input.clear();
                None
            }
            KeyCode::Esc => self.input.is_empty().then_some(Action::Quit),
            KeyCode::Enter => {
                let text = std::mem::take(&mut self.input);
                (!text.trim().is_empty()).then_some(Action::Send(text))
            }
            KeyCode::Backspace => {
                self.input.pop();
                None
            }
            KeyCode::Char(c) if !ctrl => {
                self.type_char(c);
                None
            }
            _ => None,
        }
    }

    fn type_char(&mut self, c: char) {
        if self.input.chars().count() < MAX_INPUT_CHARS {
            self.input.push(c);
        }
    }
}

/// Draws the whole view into one frame.
pub fn render(view: &ChatView, frame: &mut Frame) {
    let rows = Layout::default()
        .direction(Direction::Vertical)
        .constraints([
            Constraint::Min(3),
            Constraint::Length(1),
            Constraint::Length(3),
        ])
        .split(frame.area());
    let top = Layout::default()
        .direction(Direction::Horizontal)
        .constraints([Constraint::Min(20), Constraint::Length(24)])
        .split(rows[0]);

    // Only the newest lines that fit are built, counting the rows each takes once wrapped, so
    // the pane always ends with the newest line however long the ones before it are.
    let height = usize::from(top[0].height.saturating_sub(2));
    let width = usize::from(top[0].width.saturating_sub(2)).max(1);
    let mut used = 0;
    let mut keep = 0;
    for l in view.lines.iter().rev() {
        let chars = match l {
            ViewLine::Chat { seq, name, text } => format!("[{seq}] {name}: {text}").chars().count(),
            ViewLine::Note(note) => note.chars().count() + 3,
        };
        let needs = chars.div_ceil(width).max(1);
        if keep > 0 && used + needs > height {
            break;
        }
        used += needs;
        keep += 1;
    }
    let skip = view.lines.len() - keep;
    // A newest line taller than the pane shows its end.
    let scroll = used.saturating_sub(height).min(usize::from(u16::MAX)) as u16;
    let lines: Vec<Line> = view
        .lines
        .iter()
        .skip(skip)
        .map(|l| match l {
            ViewLine::Chat { seq, name, text } => Line::from(vec![
                Span::styled(
                    format!("[{seq}] "),
                    Style::default().add_modifier(Modifier::DIM),
                ),
                Span::styled(
                    format!("{name}: "),
                    Style::default().add_modifier(Modifier::BOLD),
                ),
                Span::raw(text.clone()),
            ]),
            ViewLine::Note(note) => Line::styled(
                format!("-- {note}"),
                Style::default().add_modifier(Modifier::ITALIC),
            ),
        })
        .collect();
    frame.render_widget(
        Paragraph::new(lines)
            .wrap(Wrap { trim: false })
            .scroll((scroll, 0))
            .block(
                Block::default()
                    .borders(Borders::ALL)
                    .title(format!(" {} ", view.island)),
            ),
        top[0],
    );
    let members: Vec<ListItem> = view
        .members
        .iter()
        .map(|m| ListItem::new(m.clone()))
        .collect();
    frame.render_widget(
        List::new(members).block(
            Block::default()
                .borders(Borders::ALL)
                .title(format!(" members ({}) ", view.members.len())),
        ),
        top[1],
    );
    let s = &view.status;
    let digest: String = s.digest.chars().take(12).collect();
    let mut status = format!(
        " seq {} | time {:.1} s | digest {} | {}",
        s.seq,
        s.time_us as f64 / 1e6,
        if digest.is_empty() { "-" } else { &digest },
        s.connection
    );
    // The key hint only when it fits: the state matters more than the reminder.
    let hint = " | Enter sends, Ctrl-C leaves";
    if status.chars().count() + hint.len() <= usize::from(rows[1].width) {
        status.push_str(hint);
    }
    frame.render_widget(
        Paragraph::new(status).style(Style::default().add_modifier(Modifier::REVERSED)),
        rows[1],
    );
    // Show the end of a long input, where the cursor is.
    let width = usize::from(rows[2].width.saturating_sub(3));
    let chars: Vec<char> = view.input.chars().collect();
    let shown: String = chars[chars.len().saturating_sub(width)..].iter().collect();
    frame.render_widget(
        Paragraph::new(format!("> {shown}")).block(Block::default().borders(Borders::ALL)),
        rows[2],
    );
    let cursor_x = rows[2].x + 3 + shown.chars().count() as u16;
    frame.set_cursor_position((
        cursor_x.min(rows[2].right().saturating_sub(2)),
        rows[2].y + 1,
    ));
}

/// Owns the terminal while the chat runs: raw mode and the alternate screen, given back when
/// dropped (also on an error or a panic unwinding through the caller).
pub struct Screen {
    terminal: ratatui::DefaultTerminal,
}

impl Screen {
    /// Takes over the terminal.
    pub fn enter() -> std::io::Result<Screen> {
        let terminal = ratatui::try_init()?;
        Ok(Screen { terminal })
    }

    /// Draws the view.
    pub fn draw(&mut self, view: &ChatView) -> std::io::Result<()> {
        self.terminal.draw(|f| render(view, f)).map(|_| ())
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        ratatui::restore();
    }
}

/// Terminal events as an async stream, read off the tokio runtime's threads.
pub fn events() -> ratatui::crossterm::event::EventStream {
    ratatui::crossterm::event::EventStream::new()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;

    fn key(code: KeyCode, modifiers: KeyModifiers) -> Event {
        Event::Key(KeyEvent::new(code, modifiers))
    }

    fn typed(view: &mut ChatView, text: &str) {
        for c in text.chars() {
            assert_eq!(
                view.handle_event(&key(KeyCode::Char(c), KeyModifiers::NONE)),
                None
            );
        }
    }

    #[test]
    fn typing_enter_and_leaving() {
        let mut v = ChatView::new("garden");
        typed(&mut v, "hi there");
        assert_eq!(v.input(), "hi there");
        // Incoming lines do not touch what is being typed.
        v.push_chat(1, "bob", "hello");
        assert_eq!(v.input(), "hi there");
        // Ctrl-D with text typed does not leave (it would lose the line).
        assert_eq!(
            v.handle_event(&key(KeyCode::Char('d'), KeyModifiers::CONTROL)),
            None
        );
        assert_eq!(
            v.handle_event(&key(KeyCode::Enter, KeyModifiers::NONE)),
            Some(Action::Send("hi there".into()))
        );
        assert_eq!(v.input(), "");
        assert_eq!(
            v.handle_event(&key(KeyCode::Enter, KeyModifiers::NONE)),
            None
        );
        assert_eq!(
            v.handle_event(&key(KeyCode::Char('d'), KeyModifiers::CONTROL)),
            Some(Action::Quit)
        );
        typed(&mut v, "x");
        assert_eq!(
            v.handle_event(&key(KeyCode::Char('c'), KeyModifiers::CONTROL)),
            Some(Action::Quit)
        );
        v.handle_event(&key(KeyCode::Backspace, KeyModifiers::NONE));
        assert_eq!(v.input(), "");
    }

    #[test]
    fn the_view_is_bounded() {
        let mut v = ChatView::new("garden");
        for i in 0..(MAX_VIEW_LINES as u64 + 10) {
            v.push_chat(i, "a", "b");
        }
        assert_eq!(v.lines().count(), MAX_VIEW_LINES);
        typed(&mut v, &"y".repeat(MAX_INPUT_CHARS + 5));
        assert_eq!(v.input().chars().count(), MAX_INPUT_CHARS);
    }

    #[test]
    fn long_lines_never_push_the_newest_line_off_the_pane() {
        let mut v = ChatView::new("garden");
        for i in 0..5 {
            v.push_chat(i, "ada", &"long words ".repeat(30));
        }
        v.push_chat(99, "bob", "the newest line");
        let mut t = Terminal::new(TestBackend::new(60, 14)).expect("terminal");
        t.draw(|f| render(&v, f)).expect("draw");
        let screen: String = t
            .backend()
            .buffer()
            .content()
            .chunks(60)
            .map(|row| row.iter().map(|c| c.symbol()).collect::<String>() + "\n")
            .collect();
        assert!(screen.contains("[99] bob: the newest line"), "{screen}");
    }

    #[test]
    fn renders_messages_members_status_and_input() {
        let mut v = ChatView::new("garden");
        v.push_note("joined island garden");
        v.push_chat(7, "ada", "the newest line");
        v.set_members(vec!["ada".into(), "bob".into()]);
        v.status = Status {
            seq: 7,
            time_us: 2_500_000,
            digest: "0123456789abcdef".into(),
            connection: "connected to 127.0.0.1:7470".into(),
        };
        typed(&mut v, "draft");
        let mut t = Terminal::new(TestBackend::new(100, 12)).expect("terminal");
        t.draw(|f| render(&v, f)).expect("draw");
        let screen: String = t
            .backend()
            .buffer()
            .content()
            .chunks(100)
            .map(|row| row.iter().map(|c| c.symbol()).collect::<String>() + "\n")
            .collect();
        for want in [
            "garden",
            "[7] ada: the newest line",
            "members (2)",
            "bob",
            "seq 7",
            "time 2.5 s",
            "digest 0123456789ab",
            "connected to 127.0.0.1:7470",
            "> draft",
        ] {
            assert!(screen.contains(want), "{want:?} missing from:\n{screen}");
        }
    }
}
