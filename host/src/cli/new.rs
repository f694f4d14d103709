//! `wharf new`: a ready-to-build service project from the templates.

use std::path::PathBuf;

use anyhow::Result;

use super::scaffold::{self, Language};

#[derive(clap::Args, Debug)]
pub struct NewArgs {
    /// The service name (lowercase letters, digits and '-'): it serves at
    /// /NAME.
    name: String,
    /// The language: js, ts, python or rust.
    #[arg(long, default_value = "js", value_parser = |s: &str| s.parse::<Language>())]
    lang: Language,
    /// Where to create it [default: ./NAME].
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
}

/// Creates the project and says what to do next.
pub fn run(args: NewArgs) -> Result<()> {
    let dir = args.dir.unwrap_or_else(|| PathBuf::from(&args.name));
    let project = scaffold::create(&args.name, args.lang, &dir)?;
    println!(
        "created {} ({} files)\n\nnext:\n  {}",
        project.dir.display(),
        project.files.len(),
        project.next_steps
    );
    Ok(())
}
