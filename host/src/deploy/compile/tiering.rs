//! Which compiler turns a component into native code, and when.
//!
//! With [`Tiers::Tiered`] (the default) a component whose optimised code is
//! not in the cache is compiled first with Winch, wasmtime's single-pass
//! baseline compiler — several times faster than Cranelift, for slower code
//! — and deployed as soon as that finishes. The deployer then compiles it
//! again with Cranelift in the background ([`optimise`]) and swaps the
//! optimised version in, keeping the generation. Only optimised code is
//! cached, so a restart serves it at once. A component Winch cannot compile
//! (a feature it lacks) goes to Cranelift directly.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, Result, anyhow};
use wasmtime::component::Component;

use crate::deploy::compile::cache::CodeCaches;
use crate::deploy::compile::deployment::{CompileInfo, Deployment, explain_link_error};
use crate::guest::GuestExports;
use crate::guest::engine::{EngineKind, MemoryInit, Runtime, Tier, Tiers};

/// A component's native code and how it was obtained.
pub(crate) struct Compiled {
    /// The compiled component (shared with the other services that run the
    /// same code).
    pub component: Arc<Component>,
    /// The engine it was compiled for (and runs on).
    pub kind: EngineKind,
    /// Whether it came from the compiled-code cache.
    pub cache_hit: bool,
    /// Why Winch could not compile it, when Cranelift did instead.
    pub baseline_refused: Option<String>,
}

/// Compiles `wasm` (whose digest is `digest`) for the first tier the
/// runtime's [`Tiers`] setting asks for, serving optimised code from the
/// cache when an earlier deploy left it there. Blocking and CPU-heavy.
pub(crate) fn compile_first(
    runtime: &Runtime,
    caches: &CodeCaches,
    wasm: &[u8],
    digest: &str,
) -> Result<Compiled> {
    let init = MemoryInit::for_component_size(wasm.len());
    let tiers = runtime.tiers();
    if tiers == Tiers::Tiered {
        for concurrent in [false, true] {
            let kind = EngineKind::new(init, concurrent, Tier::Optimised);
            if let Some(component) = cached(runtime, caches, kind, digest) {
                return Ok(Compiled {
                    component,
                    kind,
                    cache_hit: true,
                    baseline_refused: None,
                });
            }
        }
    }
    match compile_tier(runtime, caches, wasm, digest, init, tiers.first()) {
        // Winch lacks some features (tail calls, exceptions, GC, some SIMD);
        // if Cranelift compiles it, that is what serves. If Cranelift
        // refuses it too, its reason is the one reported.
        Err(baseline) if tiers == Tiers::Tiered => {
            let compiled = compile_tier(runtime, caches, wasm, digest, init, Tier::Optimised)?;
            Ok(Compiled {
                baseline_refused: Some(format!("{baseline:#}")),
                ..compiled
            })
        }
        other => other,
    }
}

/// Compiles `wasm` with `tier`'s compiler on the engine that suits it: a
/// component the engine without the async ABI refuses for using it (a WASI
/// 0.3 component) goes to the one with it. Optimised code is looked up in
/// and stored to the cache. Blocking and CPU-heavy.
pub(crate) fn compile_tier(
    runtime: &Runtime,
    caches: &CodeCaches,
    wasm: &[u8],
    digest: &str,
    init: MemoryInit,
    tier: Tier,
) -> Result<Compiled> {
    let plain = EngineKind::new(init, false, tier);
    let (compiled, kind) = match compile_on(runtime, caches, plain, wasm, digest) {
        // Validation stops there at once, before any compiling.
        Err(error) if error.contains("requires the component model async feature") => {
            let concurrent = EngineKind::new(init, true, tier);
            (
                compile_on(runtime, caches, concurrent, wasm, digest),
                concurrent,
            )
        }
        other => (other, plain),
    };
    let (component, cache_hit) = compiled.map_err(|error| anyhow!("invalid component: {error}"))?;
    Ok(Compiled {
        component,
        kind,
        cache_hit,
        baseline_refused: None,
    })
}

/// Compiles `wasm` on `kind`'s engine, through its cache if it has one.
/// Returns the component and whether it came from the cache.
fn compile_on(
    runtime: &Runtime,
    caches: &CodeCaches,
    kind: EngineKind,
    wasm: &[u8],
    digest: &str,
) -> std::result::Result<(Arc<Component>, bool), String> {
    if let Some(component) = cached(runtime, caches, kind, digest) {
        return Ok((component, true));
    }
    let component = Arc::new(
        runtime
            .compile(kind, wasm)
            .map_err(|err| format!("{err:#}"))?,
    );
    caches.keep(kind, digest, &component);
    if let Some(cache) = caches.for_kind(kind) {
        cache.store(digest, &component);
    }
    Ok((component, false))
}

/// `kind`'s compiled code for `digest`: the code another service runs
/// already, else the cache's entry, if its engine has a cache and the
/// entry is there.
fn cached(
    runtime: &Runtime,
    caches: &CodeCaches,
    kind: EngineKind,
    digest: &str,
) -> Option<Arc<Component>> {
    if let Some(component) = caches.in_use_for(kind, digest) {
        return Some(component);
    }
    let component = Arc::new(
        caches
            .for_kind(kind)?
            .load(runtime.flavour(kind).engine(), digest)?,
    );
    caches.keep(kind, digest, &component);
    Some(component)
}

/// The optimised (Cranelift) version of `baseline`, a deployment served
/// from Winch code: the same service, generation, configuration and request
/// slots, run by code compiled from `wasm` (its component's bytes) and
/// stored in the cache. Blocking and CPU-heavy.
pub(crate) fn optimise(
    runtime: &Runtime,
    caches: &CodeCaches,
    baseline: &Deployment,
    wasm: &[u8],
) -> Result<Deployment> {
    let started = Instant::now();
    let kind = baseline.guest().engine_kind().with_tier(Tier::Optimised);
    let (component, cache_hit) = compile_on(runtime, caches, kind, wasm, baseline.digest())
        .map_err(|error| anyhow!("Cranelift cannot compile it: {error}"))?;
    let pre = runtime
        .flavour(kind)
        .linker()
        .instantiate_pre(&component)
        .map_err(|err| explain_link_error(&format!("{err:#}")))
        .context("linking the optimised code")?;
    let exports = GuestExports::find(&pre).map_err(anyhow::Error::msg)?;
    let guest = baseline.guest().recompiled(kind, pre, exports, component);
    let compile = CompileInfo {
        queued: Duration::ZERO,
        duration: started.elapsed(),
        cache_hit,
        memory_init: kind.init,
        optimised_at: Some(SystemTime::now()),
    };
    Ok(baseline.with_guest(Arc::new(guest), compile))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::engine::EngineOptions;

    /// Compiles the component `wat` for the first tier of `tiers`, with no
    /// cache.
    fn compile_wat(tiers: Tiers, wat: &str) -> Result<Compiled> {
        let runtime = Runtime::new(&EngineOptions {
            pooling: false,
            cache_dir: None,
            tiers: Some(tiers),
            ..EngineOptions::default()
        })?;
        let wasm = wat::parse_str(wat)?;
        compile_first(&runtime, &CodeCaches::default(), &wasm, "")
    }

    /// A component whose core module uses a tail call, which Winch does
    /// not implement and Cranelift does.
    const TAIL_CALLING: &str = r#"
        (component
          (core module $m
            (func $countdown (export "countdown") (param i32) (result i32)
              (if (result i32) (i32.eqz (local.get 0))
                (then (i32.const 0))
                (else (return_call $countdown (i32.sub (local.get 0) (i32.const 1)))))))
          (core instance $i (instantiate $m)))
    "#;

    const PLAIN: &str = r#"
        (component
          (core module $m (func (export "one") (result i32) (i32.const 1)))
          (core instance $i (instantiate $m)))
    "#;

    #[test]
    fn a_new_component_is_compiled_with_winch_first() {
        let compiled = compile_wat(Tiers::Tiered, PLAIN).unwrap();
        assert_eq!(compiled.kind.tier, Tier::Baseline);
        assert!(compiled.baseline_refused.is_none());
    }

    #[test]
    fn what_winch_cannot_compile_goes_to_cranelift_with_the_reason() {
        let compiled = compile_wat(Tiers::Tiered, TAIL_CALLING).unwrap();
        assert_eq!(compiled.kind.tier, Tier::Optimised);
        let reason = compiled.baseline_refused.unwrap();
        assert!(reason.contains("tail call"), "{reason}");
    }

    #[test]
    fn winch_only_refuses_what_winch_cannot_compile() {
        let refused = compile_wat(Tiers::Winch, TAIL_CALLING).err().unwrap();
        assert!(format!("{refused:#}").contains("tail call"), "{refused:#}");
    }

    #[test]
    fn an_invalid_component_is_refused_with_cranelift_s_reason() {
        let refused = compile_wat(
            Tiers::Tiered,
            "(component (core module (func (result i32))))",
        )
        .err()
        .unwrap();
        assert!(
            format!("{refused:#}").starts_with("invalid component"),
            "{refused:#}"
        );
    }
}
