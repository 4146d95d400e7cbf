// Parses and validates an AsyncAPI document with @asyncapi/parser, the parser the AsyncAPI
// tools are built on (scripts/setup.sh installs it under .cache/asyncapi).
//
//   node tests/asyncapi/validate.mjs DOCUMENT [PARSER_DIR]
//
// Prints every diagnostic as one JSON object per line (severity 0 error, 1 warning, 2 info,
// 3 hint) and exits 1 when there is an error or the document could not be parsed, 2 when the
// parser is not installed, 0 otherwise.
import { createRequire } from "node:module";
import { existsSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const [documentPath, parserDir = path.join(here, "..", "..", ".cache", "asyncapi")] =
  process.argv.slice(2);
if (!documentPath) {
  console.error("usage: node validate.mjs DOCUMENT [PARSER_DIR]");
  process.exit(2);
}
const manifest = path.join(parserDir, "package.json");
if (!existsSync(path.join(parserDir, "node_modules", "@asyncapi", "parser"))) {
  console.error(`@asyncapi/parser is not installed in ${parserDir}: run scripts/setup.sh`);
  process.exit(2);
}
// The parser lives outside this tree: resolve it from its own directory.
const { Parser, fromFile } = createRequire(manifest)("@asyncapi/parser");

const parser = new Parser();
const { document, diagnostics } = await fromFile(parser, path.resolve(documentPath)).parse();
for (const d of diagnostics) {
  console.log(
    JSON.stringify({
      severity: d.severity,
      code: d.code,
      message: d.message,
      path: d.path,
    }),
  );
}
const errors = diagnostics.filter((d) => d.severity === 0);
if (document === undefined || errors.length > 0) {
  console.error(`${documentPath}: ${errors.length} error(s); the document is not valid AsyncAPI`);
  process.exit(1);
}
console.error(`${documentPath}: valid AsyncAPI ${document.version()}`);
