//! `wharf rm`: a service off a running host through its admin API.

use anyhow::{Context as _, Result};

use super::client::AdminArgs;

#[derive(clap::Args, Debug)]
pub struct RmArgs {
    /// The service to remove.
    name: String,
    #[command(flatten)]
    admin: AdminArgs,
}

/// Removes the service and prints the host's answer.
pub async fn run(args: RmArgs) -> Result<()> {
    let client = args.admin.client()?;
    let answer = client
        .remove(&args.name)
        .await
        .with_context(|| format!("removing {}", args.name))?;
    println!("{}", answer.trim());
    Ok(())
}
