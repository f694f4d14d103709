//! `wharf deploy`: a component (and its manifest) to a running host
//! through its admin API, waiting until it serves.

use std::path::PathBuf;

use anyhow::{Context as _, Result};

use super::client::{AdminArgs, DeployOutcome};
use super::{manifest_for, service_name};

#[derive(clap::Args, Debug)]
pub struct DeployArgs {
    /// The component file.
    file: PathBuf,
    /// Its manifest [default: NAME.toml beside the file, if there is one].
    #[arg(long, value_name = "FILE")]
    manifest: Option<PathBuf>,
    /// The service name [default: the file's name without .wasm].
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    #[command(flatten)]
    admin: AdminArgs,
}

/// Deploys the file and says where it serves.
pub async fn run(args: DeployArgs) -> Result<()> {
    let name = service_name(&args.file, args.name.as_deref())?;
    let manifest = manifest_for(&args.file, args.manifest);
    let client = args.admin.client()?;
    let outcome = client
        .deploy(&name, &args.file, manifest.as_deref(), |waited| {
            eprintln!(
                "wharf: {name}: the host is compiling it ({}s so far)",
                waited.as_secs()
            );
        })
        .await
        .with_context(|| format!("deploying {name}"))?;
    match outcome {
        DeployOutcome::Serving {
            generation,
            digest,
            route,
        } => println!("{name}: serving at {route}, generation {generation}, {digest}"),
        DeployOutcome::Accepted(why) => println!("{name}: {}", why.trim()),
    }
    Ok(())
}
