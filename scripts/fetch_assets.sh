#!/usr/bin/env bash
# Fetch the JavaScript the built HTML needs to render offline, pinned, from the npm registry.
#
#   bash scripts/fetch_assets.sh DEST        (scripts/setup.sh calls it with DEST=_assets)
#
# By default the pages would load MathJax, mermaid, require.js and the ipywidgets manager from CDNs; with no
# network, math stays raw, diagrams stay text and sliders do not appear. This script copies only the files
# the pages load into DEST, which the book serves at its root (`html_extra_path: [_assets]` in _config.yml):
#
#   DEST/mathjax/es5/tex-mml-chtml.js                  mathjax_path: ../mathjax/es5/tex-mml-chtml.js
#   DEST/mathjax/es5/output/chtml/fonts/woff-v2/       (fonts, loaded relative to the script)
#   DEST/mathjax/es5/input/tex/extensions/             (TeX packages loaded on demand, e.g. \require)
#   DEST/mermaid/mermaid.esm.min.mjs                   mermaid_use_local: ../mermaid/mermaid.esm.min.mjs
#   DEST/mermaid/chunks/mermaid.esm.min/*.mjs          (ES modules imported by the one above)
#   DEST/widgets/require.js                            nb_ipywidgets_js: ../widgets/require.js
#   DEST/widgets/require-config.js (written here)      nb_ipywidgets_js: ../widgets/require-config.js
#   DEST/widgets/embed-amd.js (+ its icon fonts)       nb_ipywidgets_js: ../widgets/embed-amd.js
#
# (The "../" is there because Sphinx resolves these paths against _static/.)
# Never put these under _static/: Jupyter Book 1 would then add every .js file found there to every page.
#
# Idempotent: when DEST/.versions already lists these exact versions (and this script has not changed) and
# every file is there it does nothing (FORCE=1 fetches again). The tarballs are downloaded with `npm pack`
# (no dependencies, no install scripts; npm checks each tarball against the registry's integrity hash) into
# a temporary folder that is removed.
set -euo pipefail

MATHJAX=mathjax@3.2.2
MERMAID=mermaid@11.12.1
HTML_MANAGER=@jupyter-widgets/html-manager@1.0.6
REQUIREJS=requirejs@2.3.7

die() { echo "fetch_assets.sh: error: $*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: bash scripts/fetch_assets.sh DEST   (e.g. _assets)"
DEST=$1

command -v npm >/dev/null 2>&1 \
  || die "npm is not installed; install Node.js and npm (Debian: apt-get install -y npm) and run this again"
command -v tar >/dev/null 2>&1 || die "tar is not installed"

VERSIONS="$MATHJAX $MERMAID $HTML_MANAGER $REQUIREJS"
MANIFEST="$VERSIONS script:$(sha256sum < "${BASH_SOURCE[0]}" | cut -c1-16)"
# The files the pages load directly; the check below also requires the folders to be non-empty.
REQUIRED_FILES=(
  mathjax/es5/tex-mml-chtml.js
  mermaid/mermaid.esm.min.mjs
  widgets/require.js
  widgets/require-config.js
  widgets/embed-amd.js
)
REQUIRED_DIRS=(
  mathjax/es5/output/chtml/fonts/woff-v2
  mathjax/es5/input/tex/extensions
  mermaid/chunks/mermaid.esm.min
)

complete() {  # complete DIR: every required file and a non-empty folder for every required folder
  local d=$1 f
  for f in "${REQUIRED_FILES[@]}"; do [ -s "$d/$f" ] || return 1; done
  for f in "${REQUIRED_DIRS[@]}"; do [ -n "$(ls -A "$d/$f" 2>/dev/null)" ] || return 1; done
}

if [ "${FORCE:-0}" != 1 ] && [ "$(cat "$DEST/.versions" 2>/dev/null)" = "$MANIFEST" ] && complete "$DEST"; then
  echo "fetch_assets.sh: $DEST is up to date ($VERSIONS); FORCE=1 to fetch again"
  exit 0
fi

TMP=$(mktemp -d "${TMPDIR:-/tmp}/lightlm-assets.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

echo "fetch_assets.sh: downloading $VERSIONS from the npm registry"
# npm writes the tarball names to stdout, one a line, in the order asked for.
# (--loglevel=error hides warnings about unrelated user config.)
mapfile -t TARBALLS < <(cd "$TMP" && npm pack --loglevel=error --pack-destination "$TMP" \
                          "$MATHJAX" "$MERMAID" "$HTML_MANAGER" "$REQUIREJS")
[ "${#TARBALLS[@]}" -eq 4 ] || die "npm pack returned ${#TARBALLS[@]} tarballs, expected 4: ${TARBALLS[*]}"

unpack() {  # unpack TARBALL NAME -> $TMP/NAME/package/...
  mkdir -p "$TMP/$2"
  tar -xzf "$TMP/$1" -C "$TMP/$2" || die "could not unpack $1"
  [ -d "$TMP/$2/package" ] || die "$1 has no package/ folder"
}
unpack "${TARBALLS[0]}" mathjax
unpack "${TARBALLS[1]}" mermaid
unpack "${TARBALLS[2]}" html-manager
unpack "${TARBALLS[3]}" requirejs

OUT="$TMP/out"
mkdir -p "$OUT/mathjax/es5/output/chtml/fonts" "$OUT/mathjax/es5/input/tex" \
         "$OUT/mermaid/chunks" "$OUT/widgets"

src=$TMP/mathjax/package
cp "$src/es5/tex-mml-chtml.js" "$OUT/mathjax/es5/"
cp -R "$src/es5/output/chtml/fonts/woff-v2" "$OUT/mathjax/es5/output/chtml/fonts/"
cp -R "$src/es5/input/tex/extensions" "$OUT/mathjax/es5/input/tex/"
cp "$src/LICENSE" "$OUT/mathjax/LICENSE"

src=$TMP/mermaid/package
# The ES module imports ./chunks/mermaid.esm.min/*.mjs; source maps are left out (browsers need them only
# with developer tools open).
cp "$src/dist/mermaid.esm.min.mjs" "$OUT/mermaid/"
mkdir -p "$OUT/mermaid/chunks/mermaid.esm.min"
cp "$src"/dist/chunks/mermaid.esm.min/*.mjs "$OUT/mermaid/chunks/mermaid.esm.min/"
cp "$src/LICENSE" "$OUT/mermaid/LICENSE"

src=$TMP/html-manager/package
# embed-amd.js bundles the manager with the base and controls widgets (sliders, buttons, ...), so those need
# no network; only third-party widget modules (none in this book) would be looked for on the CDN.
# Its Font Awesome icon fonts go beside it, woff2 and woff only (the formats current browsers pick).
cp "$src/dist/embed-amd.js" "$OUT/widgets/"
cp "$src"/dist/*.woff2 "$src"/dist/*.woff "$OUT/widgets/"
cp "$src/LICENSE" "$OUT/widgets/LICENSE.html-manager"   # require.js carries its MIT notice in its header

cp "$TMP/requirejs/package/require.js" "$OUT/widgets/require.js"

# The manager in embed-amd.js takes the folder of its require.js module as the base URL of those icon fonts;
# left alone, require.js puts that module in the page's own folder and the fonts 404. This tiny script,
# loaded between require.js and embed-amd.js, maps the module to this folder from any page depth.
cat > "$OUT/widgets/require-config.js" <<'JS'
// Written by scripts/fetch_assets.sh (lightlm). Load after require.js and before embed-amd.js.
// embed-amd.js takes the folder of its require.js module as the base URL of its icon fonts; map that
// module to the folder of this script (where the fonts are), whatever the depth of the page.
(function () {
  var script = document.currentScript;
  if (!script || !window.requirejs) { return; }
  var here = script.src.replace(/[?#].*$/, "").replace(/\/[^\/]*$/, "");
  window.requirejs.config({ paths: { "@jupyter-widgets/html-manager/dist": here } });
})();
JS

complete "$OUT" || die "the unpacked packages lack an expected file (layout changed?)"
echo "$MANIFEST" > "$OUT/.versions"

# Replace DEST's asset folders (and only those: setup.sh keeps its own stamp file in DEST).
mkdir -p "$DEST"
for d in mathjax mermaid widgets; do
  rm -rf "${DEST:?}/$d"
  cp -R "$OUT/$d" "$DEST/$d"
done
cp "$OUT/.versions" "$DEST/.versions"

echo "fetch_assets.sh: wrote $DEST:"
for d in mathjax mermaid widgets; do
  printf '   %-8s %6s in %4s files\n' "$d" "$(du -sh "$DEST/$d" | cut -f1)" "$(find "$DEST/$d" -type f | wc -l)"
done
