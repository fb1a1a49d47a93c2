//! `wick run RECIPE.lua`: set the run up, run the recipe under the guard, finalize.

use crate::error::Result;
use crate::run::guard;
use crate::setup::{self, Resume, RunSpec};
use std::path::Path;

pub fn run(recipe: &Path, mut spec: RunSpec) -> Result<i32> {
    let src = setup::read_recipe(recipe)?;
    spec.recipe = Some((recipe.to_path_buf(), src.clone()));
    let run = setup::open(&spec)?;
    let chunk = if recipe == Path::new("-") {
        "=stdin".to_string()
    } else {
        format!("@{}", recipe.display())
    };
    let (ending, _) = guard::run_chunk(&run.lua, &chunk, &src);
    Ok(guard::finalize(&run.lua, &run.ctx, &ending))
}

/// `--resume` with no value resumes from the checkpoint in `--ckpt-dir`.
pub fn resume_arg(resume: Option<String>) -> Resume {
    match resume {
        None => Resume::No,
        Some(p) if p.is_empty() => Resume::Default,
        Some(p) => Resume::Path(p.into()),
    }
}
