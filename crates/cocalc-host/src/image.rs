//! The image allowlist: which images projects may ask for.

use cocalc_core::RunnerError;

/// Which images a runner will start, and which one it uses when a spec names
/// none. Names are compared exactly as written (`localhost/cocalc:1` and
/// `cocalc:1` are different entries): list every spelling you accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImagePolicy {
    default: String,
    allowed: Vec<String>,
}

impl ImagePolicy {
    /// A policy whose only image is `default`.
    pub fn single(default: impl Into<String>) -> Self {
        let default = default.into();
        ImagePolicy {
            allowed: vec![default.clone()],
            default,
        }
    }

    /// A policy with `default` and the `others` (the default is always
    /// allowed; duplicates are dropped).
    pub fn new(default: impl Into<String>, others: impl IntoIterator<Item = String>) -> Self {
        let mut p = ImagePolicy::single(default);
        for o in others {
            if !p.allowed.contains(&o) {
                p.allowed.push(o);
            }
        }
        p
    }

    /// The image used when a spec names none.
    pub fn default_image(&self) -> &str {
        &self.default
    }

    /// Every allowed image, the default first.
    pub fn allowed(&self) -> &[String] {
        &self.allowed
    }

    /// The image to run for a request: the default for `None`, the requested
    /// one if listed, else [`RunnerError::ImageNotAllowed`] naming the image
    /// and the list.
    pub fn resolve(&self, requested: Option<&str>) -> Result<String, RunnerError> {
        match requested {
            None => Ok(self.default.clone()),
            Some(img) if self.allowed.iter().any(|a| a == img) => Ok(img.to_string()),
            Some(img) => Err(RunnerError::ImageNotAllowed {
                image: img.to_string(),
                allowed: self.allowed.clone(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_default_listed_and_refuses_others_by_name() {
        let p = ImagePolicy::new("localhost/a:1", ["localhost/b:2".to_string()]);
        assert_eq!(p.resolve(None).unwrap(), "localhost/a:1");
        assert_eq!(p.resolve(Some("localhost/b:2")).unwrap(), "localhost/b:2");
        let e = p.resolve(Some("ubuntu:99.04")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "image not allowed: ubuntu:99.04; allowed: localhost/a:1, localhost/b:2"
        );
    }

    #[test]
    fn default_is_always_allowed_once() {
        let p = ImagePolicy::new("x", ["x".to_string(), "y".to_string()]);
        assert_eq!(p.allowed(), ["x".to_string(), "y".to_string()]);
        assert_eq!(p.default_image(), "x");
    }
}
