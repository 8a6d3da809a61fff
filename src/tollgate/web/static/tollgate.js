// Tollgate dashboard: the only script. Filter forms drop their empty fields before they
// submit, so the URL holds just the filter in use (shareable; the back button restores it).
// Everything works without it.
"use strict";
document.addEventListener("submit", (event) => {
  const form = event.target;
  if (!(form instanceof HTMLFormElement) || !form.classList.contains("filters-form")) return;
  for (const field of form.elements) {
    if ((field instanceof HTMLInputElement || field instanceof HTMLSelectElement) &&
        field.name && field.value === "" && !field.disabled) {
      field.disabled = true;
    }
  }
  // Re-enable after the navigation starts, so the form is usable when the page comes back.
  setTimeout(() => { for (const field of form.elements) field.disabled = false; }, 0);
});
