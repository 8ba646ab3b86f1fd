// Render the formulas pymdownx.arithmatex (generic mode) leaves in the page as
// <span class="arithmatex">\(...\)</span> and <div class="arithmatex">\[...\]</div>, with the
// KaTeX vendored in docs/assets/katex (no CDN: the docs render offline). Only those elements
// are touched, so a "$" elsewhere in the prose or in code stays as written.
// document$ is Material's page observable: it fires on the first load and after every
// instant-navigation page change.
document$.subscribe(({ body }) => {
  body.querySelectorAll(".arithmatex").forEach((el) => {
    renderMathInElement(el, {
      delimiters: [
        { left: "\\(", right: "\\)", display: false },
        { left: "\\[", right: "\\]", display: true },
      ],
      throwOnError: false,
    });
  });
});
