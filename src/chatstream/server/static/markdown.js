// A small Markdown renderer that builds DOM nodes, never HTML strings.
//
// Model and tool text is untrusted. Every piece of it reaches the page through
// a text node (createTextNode / textContent), so markup in it is shown as text
// and can never become an element. Only the constructs below become elements:
// paragraphs, headings, lists, fenced code, `code`, **bold**, *em*, and links
// whose target is http(s). It is forgiving on purpose: an answer is rendered
// again on every token, so an unclosed fence or ** must render sensibly.

const FENCE = /^\s*```\s*([\w+#.-]*)\s*$/;
const HEADING = /^(#{1,6})\s+(.*)$/;
const BULLET = /^\s*[-*+]\s+(.*)$/;
const NUMBERED = /^\s*(\d{1,9})[.)]\s+(.*)$/;
const INLINE = new RegExp(
  [
    /`([^`\n]+)`/, // `code`
    /\*\*(?=\S)(.+?)\*\*/, // **bold**
    /\*(?=[^\s*])([^*\n]*?[^\s*])\*/, // *em*
    /\b_(?=\S)([^_\n]*?\S)_\b/, // _em_, but not inside snake_case
    /\[([^\]\n]+)\]\((https?:\/\/[^\s()<>]+)\)/, // [text](url), http(s) only
  ]
    .map((part) => part.source)
    .join("|"),
);

/** Render Markdown `source` into a DocumentFragment. */
export function renderMarkdown(source) {
  const out = document.createDocumentFragment();
  const lines = String(source).replace(/\r\n?/g, "\n").split("\n");
  let paragraph = [];

  const flush = () => {
    if (paragraph.length) out.append(block("p", paragraph.join("\n")));
    paragraph = [];
  };

  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const fence = FENCE.exec(line);
    if (fence) {
      flush();
      const code = [];
      // An open fence runs to the end: the rest of the answer is still streaming.
      while (++i < lines.length && !FENCE.test(lines[i])) code.push(lines[i]);
      out.append(codeBlock(code.join("\n"), fence[1]));
      continue;
    }
    if (!line.trim()) {
      flush();
      continue;
    }
    const heading = HEADING.exec(line);
    if (heading) {
      flush();
      // Headings stay small inside a chat bubble: # -> h3 ... ### and deeper -> h5.
      const level = Math.min(heading[1].length + 2, 5);
      out.append(block(`h${level}`, heading[2]));
      continue;
    }
    if (BULLET.test(line) || NUMBERED.test(line)) {
      flush();
      const ordered = !BULLET.test(line);
      const pattern = ordered ? NUMBERED : BULLET;
      const list = document.createElement(ordered ? "ol" : "ul");
      if (ordered) {
        const start = Number(NUMBERED.exec(line)[1]);
        if (start !== 1) list.start = start;
      }
      for (; i < lines.length && pattern.test(lines[i]); i++) {
        const match = pattern.exec(lines[i]);
        list.append(block("li", ordered ? match[2] : match[1]));
      }
      i--;
      out.append(list);
      continue;
    }
    paragraph.push(line);
  }
  flush();
  return out;
}

function block(tag, text) {
  const element = document.createElement(tag);
  appendInline(element, text);
  return element;
}

function codeBlock(text, language) {
  const pre = document.createElement("pre");
  const code = document.createElement("code");
  if (language) code.dataset.language = language;
  code.textContent = text;
  pre.append(code);
  return pre;
}

/** Append `text` to `parent`, turning the inline constructs into elements. */
function appendInline(parent, text) {
  let rest = text;
  let match;
  while ((match = INLINE.exec(rest))) {
    appendText(parent, rest.slice(0, match.index));
    const [, code, strong, em, em2, label, href] = match;
    if (code !== undefined) {
      const element = document.createElement("code");
      element.textContent = code;
      parent.append(element);
    } else if (strong !== undefined) {
      parent.append(block("strong", strong));
    } else if (em !== undefined || em2 !== undefined) {
      parent.append(block("em", em ?? em2));
    } else {
      const link = block("a", label);
      link.href = href; // the pattern admits only http:// and https:// targets
      link.target = "_blank";
      link.rel = "noopener noreferrer";
      parent.append(link);
    }
    rest = rest.slice(match.index + match[0].length);
  }
  appendText(parent, rest);
}

// Single line breaks inside a paragraph are kept: chat answers use them for layout.
function appendText(parent, text) {
  text.split("\n").forEach((part, index) => {
    if (index) parent.append(document.createElement("br"));
    if (part) parent.append(document.createTextNode(part));
  });
}
