//! Building the Lua state a recipe runs in: the embedded stdlib, the recipe's module path, the
//! prelude that keeps a stop from being swallowed, and the count hook that notices a stop in
//! pure Lua. The `wick` API itself is installed by whoever calls (see `setup`): the host does
//! not know the bindings.

use super::signals::{self, Interrupted};
use mlua::{HookTriggers, Lua, VmState};
use std::path::Path;

/// The embedded stdlib: `require("wick.schedule")` works with no files next to the recipe.
pub const STDLIB: &[(&str, &str)] = &[
    (
        "wick.schedule",
        include_str!("../../stdlib/wick/schedule.lua"),
    ),
    ("wick.expect", include_str!("../../stdlib/wick/expect.lua")),
];

const PRELUDE: &str = r#"
-- A stop (Ctrl+C, SIGTERM) must reach the host: a user's xpcall handler does not run for it.
do
  local raw_xpcall, stopping = xpcall, wick.__stopping
  xpcall = function(f, handler, ...)
    return raw_xpcall(f, function(e)
      if stopping() then return e end
      return handler(e)
    end, ...)
  end
end
"#;

/// Instructions between stop checks in pure Lua: cheap, and well under 100 ms.
const HOOK_EVERY: u32 = 1000;

/// A fresh Lua state: `install` puts the API in (it must define `wick.__stopping`, which the
/// prelude uses), then the stdlib, the module path next to `recipe` and the stop hook.
pub fn new_state(
    recipe: Option<&Path>,
    install: impl FnOnce(&Lua) -> mlua::Result<()>,
) -> mlua::Result<Lua> {
    let lua = Lua::new();
    install(&lua)?;
    for (name, src) in STDLIB {
        let chunk = lua
            .load(*src)
            .set_name(format!("@stdlib/{}.lua", name.replace('.', "/")))
            .into_function()?;
        lua.preload_module(name, chunk)?;
    }
    if let Some(dir) = recipe.and_then(|r| r.parent()) {
        // The recipe's own modules (and a stdlib/ beside it) are require-able.
        let d = if dir.as_os_str().is_empty() {
            ".".to_string()
        } else {
            dir.display().to_string()
        };
        let package: mlua::Table = lua.globals().get("package")?;
        let path: String = package.get("path")?;
        package.set(
            "path",
            format!("{d}/?.lua;{d}/?/init.lua;{d}/stdlib/?.lua;{path}"),
        )?;
    }
    lua.load(PRELUDE).set_name("@wick/prelude.lua").exec()?;
    install_stop_hook(&lua)?;
    Ok(lua)
}

/// Every HOOK_EVERY instructions, check the stop flag. Once stopping, check at every
/// instruction so a `pcall` loop cannot catch the error and carry on.
pub fn install_stop_hook(lua: &Lua) -> mlua::Result<()> {
    lua.set_global_hook(
        HookTriggers::new().every_nth_instruction(HOOK_EVERY),
        |lua, _| {
            if signals::stop_requested() {
                let _ =
                    lua.set_global_hook(HookTriggers::new().every_nth_instruction(1), |_, _| {
                        if signals::stop_requested() {
                            Err(mlua::Error::external(Interrupted))
                        } else {
                            Ok(VmState::Continue)
                        }
                    });
                return Err(mlua::Error::external(Interrupted));
            }
            Ok(VmState::Continue)
        },
    )
}

/// Is this error (or anything it wraps) a stop?
pub fn is_interrupt(err: &mlua::Error) -> bool {
    err.chain()
        .any(|e| e.downcast_ref::<Interrupted>().is_some())
}
