// Mask Studio's page script (app.py puts it in the page's <head>): table cells edit like a
// spreadsheet's. Gradio's Dataframe opens a selected cell's editor on a typed key but drops that
// key and appends what follows ("none" + typing "null" gave "noneull"); here the typed keys
// replace the cell's text, and Escape puts the text the editor opened with back.
(() => {
  const EDITOR = 'textarea[aria-label="Edit cell"]';
  let pending = null;              // {cell, text}: keys typed on a selected cell before its editor has focus
  const opened = new WeakMap();    // editor -> the cell's text when it opened

  function setText(editor, text) {
    editor.value = text;
    editor.dispatchEvent(new Event("input", {bubbles: true}));  // Gradio's binding reads it
    editor.setSelectionRange(text.length, text.length);
  }

  document.addEventListener("keydown", (e) => {
    const t = e.target;
    if (t instanceof HTMLTextAreaElement && t.matches(EDITOR)) {
      if (e.key === "Escape" && opened.has(t)) setText(t, opened.get(t));
      return;
    }
    const cell = t instanceof Element ? t.closest('[role="gridcell"]') : null;
    if (!cell || !cell.querySelector('[data-editable="true"]')) return;
    if (e.key.length !== 1 || e.ctrlKey || e.metaKey || e.altKey) return;
    if (pending && pending.cell === cell) {  // typed before the editor took focus: keep it
      pending.text += e.key;
      e.preventDefault();
      e.stopPropagation();
      return;
    }
    pending = {cell, text: e.key};           // Gradio opens the editor on this key (and drops the key)
    setTimeout(() => { if (pending && pending.cell === cell && !cell.querySelector(EDITOR)) pending = null; }, 1000);
  }, true);

  document.addEventListener("focusin", (e) => {
    const editor = e.target;
    if (!(editor instanceof HTMLTextAreaElement) || !editor.matches(EDITOR)) return;
    opened.set(editor, editor.value);
    const cell = editor.closest('[role="gridcell"]');
    if (pending && pending.cell === cell) setText(editor, pending.text);
    pending = null;
  }, true);
})();
