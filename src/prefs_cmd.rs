//! `isthmus prefs`: read and edit the saved profiles.

use crate::print_line;
use anyhow::Result;
use clap::Subcommand;
use isthmus_prefs::{resolve_path, Prefs};
use std::path::Path;

#[derive(Subcommand)]
pub enum PrefsCommand {
    /// Print where the prefs file is (whether or not it exists yet).
    Path,
    /// List the profiles, built in and saved.
    List,
    /// Print a profile's settings.
    Show {
        /// The profile.
        name: String,
    },
    /// Set one key of a profile (created if missing), keeping the file's comments.
    Set {
        /// The profile.
        name: String,
        /// The key, e.g. forwarding, external, port, upnp.lease_secs, limits.max_payload_bytes.
        key: String,
        /// The value.
        value: String,
    },
    /// Remove one key from a profile, so its default applies again.
    Unset {
        /// The profile.
        name: String,
        /// The key, as for `set`.
        key: String,
    },
    /// Remove a saved profile.
    Remove {
        /// The profile.
        name: String,
    },
    /// Make a profile the one `isthmus router` uses without --profile.
    Default {
        /// The profile.
        name: String,
    },
}

pub fn run(cmd: PrefsCommand, flag: Option<&Path>) -> Result<u8> {
    let path = resolve_path(flag)?;
    match cmd {
        PrefsCommand::Path => {
            print_line(&path.display().to_string());
        }
        PrefsCommand::List => {
            let prefs = Prefs::load(&path)?;
            for (name, builtin, saved) in prefs.names() {
                let origin = match (builtin, saved) {
                    (true, true) => "saved, replaces the built-in",
                    (true, false) => "built-in",
                    _ => "saved",
                };
                let default = if name == prefs.default_name() {
                    " (default)"
                } else {
                    ""
                };
                let _ = print_line(&format!("{name}\t{origin}{default}"));
            }
        }
        PrefsCommand::Show { name } => {
            let saved = Prefs::load(&path)?.render(&name)?;
            let mut lines: Vec<String> = saved.lines().map(str::to_string).collect();
            lines.push(String::new());
            lines.push(format!(
                "# what `isthmus router --profile {name}` runs with (defaults filled in):"
            ));
            lines.extend(
                crate::effective_settings(&name, flag)?
                    .into_iter()
                    .map(|l| format!("# {l}")),
            );
            for l in lines {
                if !print_line(&l) {
                    break;
                }
            }
        }
        PrefsCommand::Set { name, key, value } => {
            let mut prefs = Prefs::load(&path)?;
            prefs.set(&name, &key, &value)?;
            prefs.save()?;
            print_line(&format!(
                "set {key} = {value} in profile {name:?} ({})",
                path.display()
            ));
        }
        PrefsCommand::Unset { name, key } => {
            let mut prefs = Prefs::load(&path)?;
            prefs.unset(&name, &key)?;
            prefs.save()?;
            print_line(&format!(
                "removed {key} from profile {name:?} ({})",
                path.display()
            ));
        }
        PrefsCommand::Remove { name } => {
            let mut prefs = Prefs::load(&path)?;
            prefs.remove(&name)?;
            prefs.save()?;
            print_line(&format!("removed profile {name:?} from {}", path.display()));
        }
        PrefsCommand::Default { name } => {
            let mut prefs = Prefs::load(&path)?;
            prefs.set_default(&name)?;
            prefs.save()?;
            print_line(&format!(
                "profile {name:?} is now the default ({})",
                path.display()
            ));
        }
    }
    Ok(0)
}
