//! Stack traces in the guest's own words: a component may carry the source
//! map of the code it was built from, in a custom section named
//! [`SECTION`] (the JavaScript build of `wharf new` adds the bundle's map
//! there). Wharf reads it once, at deploy, and rewrites every stack frame a
//! guest prints — `handler@bundle.js:1:2345` — to the original file and
//! line: `handler@src/routes.js:12:7`. A component without one is logged
//! as it prints.

use std::borrow::Cow;

/// The custom section holding a source map (JSON, revision 3).
pub const SECTION: &str = "wharf:source-map";
/// Largest source map read.
const MAX_MAP: usize = 32 << 20;

/// A source map, ready to rewrite lines.
pub struct SourceMapper {
    map: sourcemap::SourceMap,
}

impl std::fmt::Debug for SourceMapper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceMapper")
            .field("sources", &self.map.get_source_count())
            .finish()
    }
}

impl SourceMapper {
    /// The source map `component` carries in a top-level [`SECTION`], if it
    /// carries a usable one (a broken one is ignored with a warning: it
    /// never stops a deploy).
    pub fn find(service: &str, component: &[u8]) -> Option<SourceMapper> {
        let mut depth = 0usize;
        for payload in wasmparser::Parser::new(0).parse_all(component) {
            let payload = payload.ok()?;
            match payload {
                wasmparser::Payload::ModuleSection { .. }
                | wasmparser::Payload::ComponentSection { .. } => depth += 1,
                wasmparser::Payload::End(_) => depth = depth.saturating_sub(1),
                wasmparser::Payload::CustomSection(section)
                    if depth == 0 && section.name() == SECTION =>
                {
                    if section.data().len() > MAX_MAP {
                        tracing::warn!(
                            service,
                            "the component's source map is over {MAX_MAP} bytes; stack traces stay as printed"
                        );
                        return None;
                    }
                    return match sourcemap::SourceMap::from_slice(section.data()) {
                        Ok(map) => Some(SourceMapper { map }),
                        Err(err) => {
                            tracing::warn!(
                                service,
                                "the component's source map is unusable ({err}); stack traces stay as printed"
                            );
                            None
                        }
                    };
                }
                _ => {}
            }
        }
        None
    }

    /// `line` with every stack frame position the map knows — a word
    /// `FILE:LINE:COLUMN` (1-based), alone, in parentheses or after a
    /// function name and `@` — moved to the original source.
    pub fn rewrite<'a>(&self, line: &'a str) -> Cow<'a, str> {
        let mut out = String::with_capacity(line.len());
        let mut changed = false;
        let mut start = 0;
        let separator = |c: char| c.is_whitespace() || c == '(' || c == ')';
        while start < line.len() {
            let end = line[start..]
                .find(separator)
                .map_or(line.len(), |i| start + i);
            let word = &line[start..end];
            let frame_at = word.rfind('@').map_or(0, |at| at + 1);
            match self.map_frame(&word[frame_at..]) {
                Some(mapped) => {
                    out.push_str(&word[..frame_at]);
                    out.push_str(&mapped);
                    changed = true;
                }
                None => out.push_str(word),
            }
            // The separator itself, if any.
            if let Some(c) = line[end..].chars().next() {
                out.push(c);
                start = end + c.len_utf8();
            } else {
                start = end;
            }
        }
        if changed {
            Cow::Owned(out)
        } else {
            Cow::Borrowed(line)
        }
    }

    /// `FILE:LINE:COLUMN` mapped, if it is one and the map knows it.
    fn map_frame(&self, frame: &str) -> Option<String> {
        let mut parts = frame.rsplitn(3, ':');
        let column: u32 = parts.next()?.parse().ok()?;
        let line: u32 = parts.next()?.parse().ok()?;
        let _file = parts.next()?;
        let line = line.checked_sub(1)?;
        let token = self.map.lookup_token(line, column.saturating_sub(1))?;
        // The nearest token may be on an earlier line: that is not this one.
        if token.get_dst_line() != line {
            return None;
        }
        let source = token.get_source()?;
        Some(format!(
            "{source}:{}:{}",
            token.get_src_line() + 1,
            token.get_src_col() + 1
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A map of a two-line bundle: line 1 col 0 from `a.js` 10:4, line 2
    /// col 2 from `b.js` 12:0.
    const MAP: &str = r#"{"version":3,"file":"bundle.js","sources":["a.js","b.js"],"names":[],"mappings":"AASI;ECEJ"}"#;

    fn component_with(section: &[u8]) -> Vec<u8> {
        let mut bytes = b"\0asm\x0d\0\x01\0".to_vec();
        let name = SECTION.as_bytes();
        let mut payload = vec![name.len() as u8];
        payload.extend_from_slice(name);
        payload.extend_from_slice(section);
        bytes.push(0);
        // LEB128 of the payload length.
        let mut len = payload.len();
        loop {
            let byte = (len & 0x7f) as u8;
            len >>= 7;
            if len == 0 {
                bytes.push(byte);
                break;
            }
            bytes.push(byte | 0x80);
        }
        bytes.extend_from_slice(&payload);
        bytes
    }

    #[test]
    fn frames_are_moved_to_the_original_source() {
        let mapper = SourceMapper::find("svc", &component_with(MAP.as_bytes())).unwrap();
        assert_eq!(mapper.rewrite("handle@bundle.js:1:1"), "handle@a.js:10:5");
        assert_eq!(
            mapper.rewrite("Error: boom\n    at route (bundle.js:2:3)"),
            "Error: boom\n    at route (b.js:12:1)"
        );
        // Not a frame, or a frame the map does not know: as printed.
        assert_eq!(
            mapper.rewrite("user@example.com said hi"),
            "user@example.com said hi"
        );
        assert_eq!(mapper.rewrite("x@bundle.js:9:1"), "x@bundle.js:9:1");
    }

    #[test]
    fn a_component_without_a_usable_map_is_logged_as_it_prints() {
        assert!(SourceMapper::find("svc", &component_with(b"not json")).is_none());
        assert!(SourceMapper::find("svc", b"\0asm\x0d\0\x01\0").is_none());
    }
}
