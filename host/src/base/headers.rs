//! Names of the HTTP headers Wharf reads and writes, in one place: the
//! front door sets them, guests and their outgoing calls see them.

/// Header carrying the request id, kept if the client sent a sane one.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Header telling a service the route prefix that was removed from the path.
pub const FORWARDED_PREFIX_HEADER: &str = "x-forwarded-prefix";

/// Response header naming the generation of the service that answered.
pub const GENERATION_HEADER: &str = "x-wharf-generation";

/// Header carrying how many service-to-service hops led to a request.
pub const HOPS_HEADER: &str = "x-wharf-hops";
