' Runs resume_at_boot.bat with no console window, waits for it and returns its exit code.
' Task Scheduler calls: wscript.exe "<project>\launchers\windows\run_hidden.vbs"
Set shell = CreateObject("WScript.Shell")
here = CreateObject("Scripting.FileSystemObject").GetParentFolderName(WScript.ScriptFullName)
code = shell.Run("cmd.exe /d /v:off /c """"" & here & "\resume_at_boot.bat""""", 0, True)
WScript.Quit code
