// The key signed in with is also the one the console's actions send (console.js reads it from sessionStorage).
"use strict";
document.getElementById("login").addEventListener("submit", () => {
  sessionStorage.setItem("peer-api-key", document.getElementById("login-key").value.trim());
});
