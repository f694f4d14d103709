//! `wharf check`: whether a file will deploy, and why not, without
//! serving it; exits 1 if it will not.

use std::path::PathBuf;

use anyhow::Result;

use super::{manifest_for, service_name};

#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// The component file.
    file: PathBuf,
    /// Its manifest [default: NAME.toml beside the file, if there is one].
    #[arg(long, value_name = "FILE")]
    manifest: Option<PathBuf>,
    /// The service name [default: the file's name without .wasm].
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Checks the file and prints the report.
pub async fn run(args: CheckArgs) -> Result<()> {
    let name = service_name(&args.file, args.name.as_deref())?;
    let manifest = manifest_for(&args.file, args.manifest);
    let report = wharf::check::check_file(&args.file, manifest.as_deref(), Some(&name)).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        if let Some(manifest) = &manifest {
            println!("manifest: {}", manifest.display());
        }
        print!("{}", report.render());
    }
    if !report.deploys() {
        std::process::exit(1);
    }
    Ok(())
}
