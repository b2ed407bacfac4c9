// tokengate token page: the copy button of a new token. The page works without this script;
// it only shows the button (hidden until then) and copies the secret on click.
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  var field = document.getElementById("new-token");
  var button = document.getElementById("copy");
  var status = document.getElementById("copy-status");
  if (!field || !button) {
    return;
  }
  button.hidden = false;
  field.addEventListener("focus", function () {
    field.select();
  });
  function copied(ok) {
    button.textContent = ok ? "Copied" : "Press Ctrl+C";
    if (status) {
      status.textContent = ok ? "Token copied to the clipboard" : "Select the token and copy it";
    }
    window.setTimeout(function () {
      button.textContent = "Copy";
    }, 2000);
  }
  button.addEventListener("click", function () {
    field.focus();
    field.select();
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(field.value).then(
        function () { copied(true); },
        function () { copied(document.execCommand("copy")); }
      );
    } else {
      copied(document.execCommand("copy"));
    }
  });
});
