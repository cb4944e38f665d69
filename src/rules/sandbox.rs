//! The module resolver behind `import`: paths resolve only under the rules folder.

use rhai::{Engine, EvalAltResult, Module, ModuleResolver, Position, Scope, Shared};
use std::path::{Component, Path, PathBuf};

/// Resolves `import "lib/dates"` to `<rules>/lib/dates.rhai`, and nothing outside.
pub struct SandboxResolver {
    root: PathBuf,
}

impl SandboxResolver {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.canonicalize().unwrap_or_else(|_| root.to_path_buf()),
        }
    }

    fn locate(&self, path: &str) -> Result<(PathBuf, String), String> {
        let rel = if path.ends_with(".rhai") {
            path.to_string()
        } else {
            format!("{path}.rhai")
        };
        let p = Path::new(&rel);
        if p.is_absolute() || rel.contains('\\') {
            return Err(format!(
                "import {path:?}: only paths under the rules folder can be imported"
            ));
        }
        if p.components().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(format!(
                "import {path:?}: '..' and '.' are not allowed in import paths"
            ));
        }
        let full = self.root.join(p);
        let canonical = full
            .canonicalize()
            .map_err(|_| format!("import {path:?}: no module {}", full.display()))?;
        if !canonical.starts_with(&self.root) {
            return Err(format!(
                "import {path:?}: resolves outside the rules folder"
            ));
        }
        Ok((canonical, format!("rules/{rel}")))
    }
}

impl ModuleResolver for SandboxResolver {
    fn resolve(
        &self,
        engine: &Engine,
        _source: Option<&str>,
        path: &str,
        pos: Position,
    ) -> Result<Shared<Module>, Box<EvalAltResult>> {
        let (file, display) = self
            .locate(path)
            .map_err(|msg| EvalAltResult::ErrorModuleNotFound(msg, pos))?;
        let text = std::fs::read_to_string(&file)
            .map_err(|e| EvalAltResult::ErrorModuleNotFound(format!("{path}: {e}"), pos))?;
        let mut ast = engine
            .compile(&text)
            .map_err(|e| Box::new(EvalAltResult::ErrorInModule(display.clone(), e.into(), pos)))?;
        ast.set_source(display.clone());
        let mut m = Module::eval_ast_as_new(Scope::new(), &ast, engine)
            .map_err(|e| Box::new(EvalAltResult::ErrorInModule(display.clone(), e, pos)))?;
        m.set_id(display);
        m.build_index();
        Ok(m.into())
    }
}
